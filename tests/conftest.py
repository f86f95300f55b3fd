"""Shared fixtures. Real data comes from ``$DRAW_JAX_SHARED_DATA`` (``.ci/run`` sets it)."""

from __future__ import annotations

import os

import pytest

DATA_ENV = "DRAW_JAX_SHARED_DATA"


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
