"""Pictures: attention boxes land on their own example's cell, where the window is; curve plots refuse bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from draw_jax import pictures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("ncols", [1, 2, 3])
def test_each_box_is_drawn_in_its_own_cell_around_its_window(ncols):
    m, h, w, scale, pad = 6, 20, 20, 2, 1
    frames = np.zeros((1, m, h, w, 1), np.float32)
    # Window i centred at pixel (x, y) = (5 + i, 12 - i), a 3x3 grid one pixel apart.
    gx = np.array([5.0 + i for i in range(m)])
    gy = np.array([12.0 - i for i in range(m)])
    delta = np.ones(m)
    (pic,) = pictures.frames_with_boxes(frames, [(gx, gy, delta)], 3, scale=scale, ncols=ncols)
    red = (pic[..., 0] > 200) & (pic[..., 1] < 100)
    for i in range(m):
        r, c = divmod(i, ncols)
        oy, ox = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        cell = red[oy : oy + h * scale, ox : ox + w * scale]
        ys, xs = np.nonzero(cell)
        assert ys.size, f"no box in cell {i}"
        # The box's centre is the window's centre (in upscaled pixels).
        assert abs((xs.min() + xs.max()) / 2 / scale - (gx[i] + 0.5)) <= 1.0
        assert abs((ys.min() + ys.max()) / 2 / scale - (gy[i] + 0.5)) <= 1.0
    assert red.sum() == sum(
        red[pad + r * (h * scale + pad) : pad + r * (h * scale + pad) + h * scale].sum()
        for r in range(-(-m // ncols))
    )  # nothing drawn on the padding between rows


def test_colour_pictures_keep_their_colours():
    # Three channels pass through unchanged (grey ones are repeated to RGB).
    red = np.zeros((2, 6, 5, 3), np.float32)
    red[..., 0] = 1.0
    tile = pictures.grid(red, ncols=2, pad=1)
    assert tile.shape == (8, 13, 3)
    np.testing.assert_array_equal(tile[1, 1], [255, 0, 0])
    frames = pictures.frames_with_boxes(np.stack([red, red]), None, n=1, scale=2)
    assert len(frames) == 2 and frames[0].shape[-1] == 3
    np.testing.assert_array_equal(frames[1][1, 1], [255, 0, 0])
    grey = pictures.grid(np.full((1, 4, 4, 1), 0.5, np.float32))
    assert np.all(grey[1:5, 1:5] == grey[1, 1, 0])  # R = G = B


def test_a_curve_whose_steps_and_bounds_differ_in_length_is_refused_by_name(tmp_path):
    curves = tmp_path / "curves.json"
    curves.write_text(json.dumps([{"label": "stage 9", "steps": [1000, 2000, 3000], "bounds": [90.1, 89.7]}]))
    out = tmp_path / "curves.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.plot_curves",
            f"--curves={curves}",
            f"--output={out}",
            "--min_step=2000",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "'stage 9'" in proc.stderr and "3 steps but 2 bounds" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
