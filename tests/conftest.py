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


def pytest_configure(config: pytest.Config) -> None:
    """One persistent JAX compilation cache for the whole test run.

    Dozens of tests (and the commands they start as subprocesses) compile the
    same tiny train and eval steps; a cache hit loads one in ~2 s instead of
    compiling it in 10-20 s. The folder is made fresh by the run's first
    process (pytest itself, or pytest-xdist's controller, whose environment the
    workers and every subprocess inherit) and removed at its end. A cache the
    user already set (``$JAX_COMPILATION_CACHE_DIR``) is used and left alone.
    Cached executables are XLA's own serialised ones: the same programs, the
    same results.
    """
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
