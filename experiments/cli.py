"""What every entry point shares: user errors end in one paragraph, not a traceback."""

from __future__ import annotations

import functools
import logging as logging_std
import sys
import textwrap
from collections.abc import Callable

from absl import logging

from draw_jax.config import ConfigError
from draw_jax.data import DataError

# Errors a user can fix from the command line: bad flags, files or workdirs.
__all__ = ["USER_ERRORS", "ConfigError", "DataError", "fail", "user_errors_as_messages"]

USER_ERRORS = (ConfigError, DataError, FileNotFoundError)


def fail(message: str, code: int = 2) -> None:
    """Prints one wrapped paragraph to stderr and exits non-zero."""
    text = textwrap.fill(f"error: {message}", width=100, break_long_words=False, break_on_hyphens=False)
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


class _QuietLibraries(logging_std.Filter):
    """Drops INFO chatter of orbax and TFDS from the console (warnings still show)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "tensorflow_datasets"))
        return record.levelno >= logging_std.WARNING or not noisy


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
