"""The documentation runs: every docstring example of the package, every ```python block of README.md."""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import draw_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(m.name for m in pkgutil.iter_modules(draw_jax.__path__) if not m.name.startswith("_"))


def readme_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"draw_jax.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of draw_jax.{name} failed"


def test_the_examples_are_collected():
    # The modules that document a usage example really have one run above.
    finder = doctest.DocTestFinder()
    for name in ("attention", "pretrained"):
        tests = finder.find(importlib.import_module(f"draw_jax.{name}"))
        assert sum(len(t.examples) for t in tests) >= 3, name


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_python_block_runs_as_written(index):
    # Each block in a fresh interpreter from the repository root, as a reader would paste it.
    proc = subprocess.run(
        [sys.executable, "-c", readme_blocks()[index]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_import_attention_loads_no_flax():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, draw_jax.attention; print('flax' in sys.modules, 'optax' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.split() == ["False", "False"], proc.stderr


def test_the_package_gives_its_public_modules_and_names():
    assert set(draw_jax.__all__) <= set(dir(draw_jax))
    for name in draw_jax.__all__:
        assert getattr(draw_jax, name) is not None
    assert draw_jax.pretrained.available()  # a module reached by attribute, no import needed
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        draw_jax.nope


def test_a_script_beside_a_clone_named_draw_jax_imports_the_package(tmp_path):
    # A clone called draw_jax, with a script in its parent folder: Python puts the
    # script's folder first on sys.path, so the clone's root (no __init__.py) is a
    # namespace package named draw_jax unless a real draw_jax is found further on.
    # setup.cfg's package_dir puts the clone's root on sys.path in an editable install.
    os.symlink(ROOT, tmp_path / "draw_jax")
    script = tmp_path / "script.py"
    script.write_text("import draw_jax\nprint(draw_jax.__file__)\nprint(draw_jax.build_config.__name__)\n")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [draw_jax.__file__, "build_config"]
