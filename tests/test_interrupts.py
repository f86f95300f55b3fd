"""Ctrl-C at any moment of a training command: one line, exit 130, never a crash or a traceback."""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from draw_jax.checkpoint import Checkpointer, verify
from tests.test_train import ROOT, TINY_FLAGS

CRASHES = ("Segmentation fault", "Fatal Python error", "Traceback", "core dumped")


def interrupted_run(data_dir: str, workdir: str, *, after: float = 0.0, after_line: str | None = None,
                    sig: int = signal.SIGINT) -> tuple[int, str, float]:  # fmt: skip
    """Starts a tiny training run, signals it ``after`` seconds after ``after_line`` appears in
    its output (or after its start); returns (exit code, stderr, seconds from the signal to the exit)."""
    args = [
        sys.executable, "-m", "experiments.train", *TINY_FLAGS, f"--data_dir={data_dir}",
        f"--workdir={workdir}", "--batch_size=50", "--num_steps=1000000", "--log_every=2",
        "--checkpoint_every=2", "--eval_every=6", "--eval_examples=200", "--steps_per_call=1",
    ]  # fmt: skip
    # As from a terminal: SIGINT at its default action (a test worker's children start with it ignored).
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    seen = []
    try:
        if after_line is not None:
            for line in proc.stderr:
                seen.append(line)
                if after_line in line:
                    break
        time.sleep(after)
        proc.send_signal(sig)
        t = time.time()
        _, rest = proc.communicate(timeout=60)
        return proc.returncode, "".join(seen) + (rest or ""), time.time() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_clean(code: int, stderr: str, seconds: float, sig: int = signal.SIGINT) -> None:
    assert code == 128 + sig, stderr[-3000:]
    assert not any(c in stderr for c in CRASHES), stderr[-3000:]
    # One message says what happened (wrapped at 100 columns), and it comes last.
    assert "error: " in stderr, stderr[-1000:]
    assert not re.search(r"\n[IWEF]\d{4} ", stderr[stderr.rindex("error: ") :]), stderr[-1000:]
    assert seconds < 10, f"took {seconds:.1f}s to exit"


@pytest.mark.parametrize(
    "phase, after_line",
    [
        ("import", None),
        ("data loading and model set-up", "devices:"),
        ("the first compile", "compiling the train step"),
        ("a step, a save or an evaluation", "step 4/"),
    ],
)
def test_ctrl_c_in_each_phase_is_one_line_and_exit_130(small_data, tmp_path, phase, after_line):
    # "import": 1 s in, while JAX is imported. (A signal in Python's own first tenth of a second,
    # before site-packages are set up, is Python's to handle: nothing of draw_jax runs yet.)
    code, stderr, seconds = interrupted_run(small_data, str(tmp_path / "w"), after_line=after_line,
                                            after=1.0 if after_line is None else 0.0)  # fmt: skip
    assert_clean(code, stderr, seconds)


def test_twenty_random_moments_no_crash_and_the_last_checkpoint_restores(small_data, tmp_path):
    rng = random.Random(0)
    moments = [rng.uniform(0.5, 10.0) for _ in range(20)]  # from JAX's import to training and saving
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(
            lambda i: interrupted_run(small_data, str(tmp_path / f"w{i}"), after=moments[i],
                                      sig=signal.SIGINT if i % 4 else signal.SIGTERM),
            range(len(moments)),
        ))  # fmt: skip
    crashes = [i for i, (_, err, _) in enumerate(runs) if any(c in err for c in CRASHES)]
    assert crashes == [], [runs[i][1][-2000:] for i in crashes]
    for i, (code, err, seconds) in enumerate(runs):
        assert_clean(code, err, seconds, signal.SIGINT if i % 4 else signal.SIGTERM)
        folder = tmp_path / f"w{i}"
        if (folder / "checkpoints").is_dir() and os.listdir(folder / "checkpoints"):
            with Checkpointer(str(folder), read_only=True) as ckpt:  # every kept checkpoint verifies
                for step in ckpt.all_steps():
                    assert verify(ckpt.step_directory(step))


def test_sigterm_never_passes_through_its_default_action_between_the_loops_handlers():
    # SIGTERM's default action kills the process with no message. A command under
    # exit_promptly hands SIGTERM to the loop's handlers around every step and save
    # (as_exceptions, recorded, deferred) and back: at no moment in between may it be at
    # its default action, or a scheduler's SIGTERM at that instant ends the run unannounced.
    script = """
import signal
from draw_jax import interrupts
installed, real = [], signal.signal
def spy(sig, handler):
    if sig == signal.SIGTERM:
        installed.append(handler)
    return real(sig, handler)
signal.signal = spy
interrupts.exit_promptly("bye")
for _ in range(2):
    with interrupts.as_exceptions():
        with interrupts.deferred():
            pass
    with interrupts.recorded():
        pass
print(len(installed), sum(h is signal.SIG_DFL for h in installed))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    changes, at_default = map(int, out.stdout.split())
    assert changes >= 8 and at_default == 0


def agree_among(*reports: tuple[list[signal.Signals], bool]) -> list:
    """``interrupts.agree`` in one thread per process, each with its own (signals, due), over
    an all-gather between the threads: what each process leaves the agreement with."""
    from draw_jax import interrupts

    rows: list = [None] * len(reports)
    barrier = threading.Barrier(len(reports), timeout=10)

    def process(i: int):
        def all_gather(mine: np.ndarray) -> np.ndarray:
            rows[i] = mine
            barrier.wait()
            return np.stack(rows)

        got, due = reports[i]
        return interrupts.agree(got, due, all_gather)

    with concurrent.futures.ThreadPoolExecutor(len(reports)) as pool:
        return list(pool.map(process, range(len(reports))))


@pytest.mark.parametrize(
    "reports, stop, due",
    [
        ([([], False), ([], False)], None, False),  # nothing happened: train on
        ([([signal.SIGINT], False), ([], False)], signal.SIGINT, False),  # Ctrl-C reached one process
        ([([signal.SIGINT], False), ([signal.SIGTERM], False)], signal.SIGTERM, False),  # the stronger wins
        ([([signal.SIGTERM, signal.SIGINT], False), ([], False)], signal.SIGTERM, False),  # in either order
        ([([], True), ([], False)], None, True),  # one process's clock says a save is due
        ([([], False), ([signal.SIGINT], True), ([], False)], signal.SIGINT, True),
    ],
)
def test_the_processes_of_a_run_agree_on_the_strongest_signal_and_on_any_due_save(reports, stop, due):
    # A run of several processes stops at one step on one signal, and saves at one step:
    # every process leaves the agreement with the same answer, whatever it saw itself.
    assert agree_among(*reports) == [(stop, due)] * len(reports)
