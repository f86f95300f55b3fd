"""Shared fixtures. Real data comes from ``$DRAW_JAX_SHARED_DATA`` (``.ci/run`` sets it)."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile

import pytest

DATA_ENV = "DRAW_JAX_SHARED_DATA"
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_MADE_CACHE = pytest.StashKey[str]()
# LLVM's optimisation of the compiled code, off: see pytest_configure.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def with_xla_flags(*flags: str) -> str:
    """``$XLA_FLAGS`` with ``flags`` added: what a subprocess of the tests is given (a test that
    needs, say, several host devices adds its flag without dropping the tests' own)."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def pytest_configure(config: pytest.Config) -> None:
    """Compiling fast, and one persistent JAX compilation cache for the whole test run.

    The tests' models are tiny, so XLA's compile time, not running, is most of
    their time. XLA still optimises each program as always (the same HLO,
    fusions and layouts); only LLVM's passes over the machine code are off
    (``--xla_backend_optimization_level=0``, unless ``$XLA_FLAGS`` sets the level),
    which halves the compile time and leaves the results equal to float
    rounding. Speed is measured by ``experiments.benchmark``, never here.

    Dozens of tests (and the commands they start as subprocesses) compile the
    same tiny train and eval steps; a cache hit loads one in ~2 s instead of
    compiling it in 10-20 s. The folder is made fresh by the run's first
    process (pytest itself, or pytest-xdist's controller, whose environment the
    workers and every subprocess inherit) and removed at its end. A cache the
    user already set (``$JAX_COMPILATION_CACHE_DIR``) is used and left alone.
    Cached executables are XLA's own serialised ones: the same programs, the
    same results.
    """
    if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = with_xla_flags(FAST_COMPILE)
    if CACHE_ENV not in os.environ and not hasattr(config, "workerinput"):
        os.environ[CACHE_ENV] = config.stash[_MADE_CACHE] = tempfile.mkdtemp(
            prefix="draw_jax_tests_jax_cache_"
        )
    if CACHE_ENV in os.environ:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])


def pytest_unconfigure(config: pytest.Config) -> None:
    made = config.stash.get(_MADE_CACHE, None)
    if made:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> str:
    """Path of the folder holding mnist/ and binarized_mnist/ (../shared/data in CI)."""
    path = os.environ.get(DATA_ENV)
    if not path:
        if os.environ.get("CI"):
            pytest.fail(f"{DATA_ENV} is unset in CI: .ci/run must point it at ../shared/data")
        pytest.skip(f"real-data test: set {DATA_ENV} to a folder with mnist/ and binarized_mnist/")
    if not os.path.isdir(os.path.join(path, "binarized_mnist")):
        pytest.fail(f"{DATA_ENV}={path} has no binarized_mnist/ folder")
    return path


@pytest.fixture(scope="session")
def binarized_train(shared_data: str):
    from draw_jax import data

    return data.load_split("binarized_mnist", "train", os.path.join(shared_data, "binarized_mnist"))


@pytest.fixture(scope="session")
def small_data(shared_data, tmp_path_factory):
    """The first 600 train / 200 valid images of the real binarized MNIST, as .amat.gz files."""
    from draw_jax import data

    folder = tmp_path_factory.mktemp("bmnist")
    src = os.path.join(shared_data, "binarized_mnist")
    for split, n in (("train", 600), ("valid", 200)):
        images = data.load_split("binarized_mnist", split, src).images[:n].reshape(n, -1)
        with gzip.open(folder / f"binarized_mnist_{split}.amat.gz", "wt") as f:
            f.write("\n".join(" ".join(map(str, row)) for row in images) + "\n")
    return str(folder)
