"""What every entry point shares: flags made from the config's declarations, and
user errors that end in one paragraph, not a traceback."""

from __future__ import annotations

import functools
import logging as logging_std
import os
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
from absl import app, flags, logging

from draw_jax import presets
from draw_jax.checkpoint import CheckpointError
from draw_jax.config import ConfigError, TrainConfig
from draw_jax.data import DataError
from draw_jax.settings import SHORTHANDS, build_config, settings

__all__ = [
    "USER_ERRORS",
    "ConfigError",
    "check_folder",
    "DataError",
    "config_from_flags",
    "define_config_flags",
    "define_process_flags",
    "fail",
    "typed_settings",
    "run",
    "start_processes",
    "user_errors_as_messages",
]

# Errors a user can fix from the command line: bad flags, files, workdirs or checkpoints.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, CheckpointError)

_DEFINE = {
    bool: flags.DEFINE_bool,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


def define_config_flags(only: Iterable[str] | None = None, *, defaults_from: str = "config") -> list[str]:
    """Defines one absl flag per setting (``draw_jax.settings.settings()``: name, type, default, help).

    Args:
      only: the settings to define (default: all, plus ``--preset`` and the
        shorthands such as ``--attention``).
      defaults_from: "config" gives each flag its declared default; "none"
        gives every flag the default None (for commands where an unset flag
        means "as the workdir's run had it").

    Returns:
      The names defined.
    """
    wanted = None if only is None else set(only)
    names = []
    for s in settings():
        if wanted is not None and s.name not in wanted:
            continue
        default = s.default if defaults_from == "config" else None
        help_text = s.help if defaults_from == "config" else f"{s.help} Default: the workdir's."
        if s.choices:
            flags.DEFINE_enum(s.name, default, list(s.choices), help_text)
        else:
            _DEFINE[s.type](s.name, default, help_text)
        names.append(s.name)
    if only is None:
        for name, (_, help_text) in SHORTHANDS.items():
            flags.DEFINE_bool(name, None, help_text)
            names.append(name)
        flags.DEFINE_enum(
            "preset",
            None,
            list(presets.PRESETS),
            "Named configuration (draw_jax/presets.py) the other flags apply on top of; "
            "default: the flags' own defaults (the paper's MNIST setup). "
            + "; ".join(f"{k}: {v or 'the defaults'}" for k, v in presets.PRESETS.items()),
        )
    return names


def typed_settings(names: Iterable[str]) -> tuple[str | None, dict[str, Any]]:
    """(--preset, {setting: value}) of the flags typed on the command line, unset ones left out."""
    f = flags.FLAGS
    given: dict[str, Any] = {name: f[name].value for name in names if f[name].present and name != "preset"}
    return (f["preset"].value if "preset" in f else None), given


def config_from_flags(names: Iterable[str]) -> TrainConfig:
    """``build_config`` from the flags given on the command line (unset ones keep their default)."""
    preset, given = typed_settings(names)
    return build_config(preset, **given)


def check_folder(flag: str, path: str) -> None:
    """Refuses, naming the flag, a path given for a folder that exists and is not one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--{flag}={path} is a file, not a folder: give a folder (it is made if missing)")


def fail(message: str, code: int = 2, *, at_once: bool = False) -> None:
    """Prints one wrapped paragraph to stderr and exits non-zero.

    ``at_once``: end the process now (``os._exit``), without waiting for
    computations still queued on the devices (an interrupted run whose files
    are already closed would otherwise take seconds to exit).
    """
    text = textwrap.fill(f"error: {message}", width=100, break_long_words=False, break_on_hyphens=False)
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    if at_once:
        sys.stdout.flush()
        os._exit(code)
    raise SystemExit(code)


class _QuietLibraries(logging_std.Filter):
    """Drops INFO chatter of orbax, TFDS and JAX's TPU probe from the console (warnings still show)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "tensorflow_datasets"))
        # JAX's INFO that no TPU library is installed reads like an error on every CPU or GPU machine.
        no_tpu = record.pathname.endswith("xla_bridge.py") and "libtpu" in record.getMessage()
        return record.levelno >= logging_std.WARNING or not (noisy or no_tpu)


def define_process_flags() -> None:
    """``--coordinator_address``, ``--num_processes``, ``--process_id``: one run as several processes."""
    flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of process 0's coordinator, for a run of several processes (all given the same "
        "flags but --process_id), e.g. 127.0.0.1:12355 on one machine.",
    )  # fmt: skip
    flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's number, 0 .. --num_processes - 1.")
    flags.DEFINE_integer(
        "initialization_timeout", 300, "Seconds to wait for every process to reach the coordinator."
    )
    flags.DEFINE_integer(
        "heartbeat_timeout", 100,
        "Seconds without a heartbeat after which a process counts as gone and the run ends.",
    )  # fmt: skip


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Returns once ``host:port`` accepts a connection. jaxlib's client aborts the process
    (SIGABRT, no message a user can act on) when the coordinator never answers.

    Raises:
      ConfigError: not reachable within ``timeout`` seconds, naming the address.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator_address={address} must be host:port, e.g. 127.0.0.1:12355")
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.time() >= deadline:
                raise ConfigError(
                    f"could not reach the coordinator at --coordinator_address={address} within "
                    f"{timeout:g} s ({e}); is process 0 running, and is the address its host's?"
                ) from None
            time.sleep(0.5)


def start_processes(auto_detect: bool = False) -> None:
    """Joins a multi-process run when the process flags ask for one (``jax.distributed``).

    Raises:
      ConfigError: the process flags are incomplete or out of range, or the
        coordinator cannot be reached (naming its address).
    """
    given = {n: getattr(flags.FLAGS, n) for n in ("coordinator_address", "num_processes", "process_id")}
    if all(v is None for v in given.values()):
        if auto_detect:
            jax.distributed.initialize()
        return
    missing = [f"--{n}" for n, v in given.items() if v is None]
    if missing:
        raise ConfigError(
            f"a run of several processes needs --coordinator_address, --num_processes and "
            f"--process_id; missing {', '.join(missing)}"
        )
    if given["num_processes"] < 1 or not 0 <= given["process_id"] < given["num_processes"]:
        raise ConfigError(
            f"--process_id={given['process_id']} must be in 0 .. --num_processes - 1 "
            f"(--num_processes={given['num_processes']})"
        )
    address, timeout = given["coordinator_address"], flags.FLAGS.initialization_timeout
    if given["process_id"] != 0:  # process 0 serves the coordinator; the others must reach it
        _wait_for_coordinator(address, timeout)
    # CPU devices of different processes talk through gloo (JAX's CPU collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=given["coordinator_address"],
            num_processes=given["num_processes"],
            process_id=given["process_id"],
            initialization_timeout=flags.FLAGS.initialization_timeout,
            heartbeat_timeout_seconds=flags.FLAGS.heartbeat_timeout,
        )
    except Exception as e:  # jaxlib raises its own kinds; the address is what the user can fix
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"process {given['process_id']} could not join the run at --coordinator_address="
            f"{given['coordinator_address']} within {flags.FLAGS.initialization_timeout} s: {first}"
        ) from None
    if jax.process_index() != 0:  # the console shows each line once: process 0's
        logging.set_verbosity(logging.WARNING)


_HELP = ("--help", "--helpshort", "--helpfull", "--helpxml", "-?")


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)``, with ``-h`` as ``--help``, help exiting 0 (absl exits 1), and
    Ctrl-C one line (exit 130), not a traceback."""
    argv = ["--help" if a == "-h" else a for a in sys.argv]
    try:
        app.run(main, argv=argv)
    except KeyboardInterrupt:  # a command that writes nothing worth a message of its own
        fail("interrupted", code=130, at_once=True)
    except SystemExit as e:
        if e.code == 1 and any(a in _HELP for a in argv[1:]):
            raise SystemExit(0) from None
        raise


def user_errors_as_messages(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wraps an absl ``main`` so that user errors print a message and exit 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> None:
        logging.get_absl_handler().addFilter(_QuietLibraries())
        try:
            main(argv)
        except USER_ERRORS as e:
            fail(str(e))

    return wrapped
