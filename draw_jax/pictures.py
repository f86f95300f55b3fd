"""DRAW's pictures: sample grids, canvases over time, attention boxes, animated GIFs.

Pillow draws and encodes (PNG, GIF); this module only arranges pixels.
Inputs are float arrays of pixel means in [0, 1] (apply sigmoid to canvases first).

Notation (``draw_jax/__init__.py``): m = images, T = steps, h, w, c = image shape.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["grid", "canvas_strip", "frames_with_boxes", "save_png", "save_gif", "window_box"]


def _to_uint8_rgb(images: np.ndarray) -> np.ndarray:
    """[m, h, w, c] in [0, 1] -> uint8 [m, h, w, 3]."""
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return (images * 255 + 0.5).astype(np.uint8)


def grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles images [m, h, w, c] into one uint8 picture [H, W, 3] (row-major)."""
    images = _to_uint8_rgb(images)
    n, h, w, _ = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 128, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            images[i]
        )
    return out


def canvas_strip(canvases: np.ndarray, num_frames: int = 10) -> np.ndarray:
    """The paper's figure: rows are examples, columns sigmoid(c_t) at evenly spaced t.

    Args:
      canvases: [T, m, h, w, c] pixel means.
      num_frames: columns; the last is always t = T.
    """
    T = canvases.shape[0]
    ts = np.unique(np.linspace(0, T - 1, min(num_frames, T)).round().astype(int))
    chosen = canvases[ts]  # [F, m, h, w, c]
    rows = np.transpose(chosen, (1, 0, 2, 3, 4)).reshape(-1, *canvases.shape[2:])
    return grid(rows, ncols=len(ts))


def window_box(gx: float, gy: float, delta: float, n: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in pixel coordinates of the outer filter centres of a grid."""
    half = (n - 1) / 2 * delta
    return gx - half, gy - half, gx + half, gy + half


def frames_with_boxes(
    frames: np.ndarray,
    windows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | None,
    n: int,
    scale: int = 4,
    ncols: int | None = None,
    color: tuple[int, int, int] = (255, 48, 48),
) -> list[np.ndarray]:
    """One picture per step: a grid of examples, each with its attention box drawn.

    Args:
      frames: [T, m, h, w, c] pixel means.
      windows: per step t, (gx [m], gy [m], delta [m]) in pixels, or None for no boxes.
      n: glimpse size of the window.
      scale: nearest-neighbour upscaling so boxes are visible.
      ncols: examples per row of each picture.

    Returns:
      T uint8 pictures [H, W, 3].
    """
    T, m, h, w, _ = frames.shape
    ncols = ncols or int(np.ceil(np.sqrt(m)))
    pad = 1
    out = []
    for t in range(T):
        big = _to_uint8_rgb(frames[t]).repeat(scale, axis=1).repeat(scale, axis=2)
        pic = Image.fromarray(grid(big.astype(np.float32) / 255.0, ncols=ncols, pad=pad))
        if windows is not None:
            draw = ImageDraw.Draw(pic)
            gx, gy, delta = (np.asarray(a) for a in windows[t])
            for i in range(m):
                r, c = divmod(i, ncols)
                ox, oy = pad + c * (w * scale + pad), pad + r * (h * scale + pad)
                x0, y0, x1, y1 = window_box(float(gx[i]), float(gy[i]), float(delta[i]), n)
                box = [o + (v + 0.5) * scale for o, v in zip((ox, oy, ox, oy), (x0, y0, x1, y1), strict=True)]
                box = [
                    np.clip(box[0], ox, ox + w * scale - 1),
                    np.clip(box[1], oy, oy + h * scale - 1),
                    np.clip(box[2], ox, ox + w * scale - 1),
                    np.clip(box[3], oy, oy + h * scale - 1),
                ]
                draw.rectangle([float(v) for v in box], outline=color, width=1)
        out.append(np.asarray(pic))
    return out


def save_png(path: str, image: np.ndarray) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def save_gif(
    path: str, frames: Sequence[np.ndarray], ms_per_frame: int = 80, hold_last_ms: int = 1000
) -> str:
    """An endlessly looping GIF; the final frame is held a little longer."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pics = [Image.fromarray(f) for f in frames]
    durations = [ms_per_frame] * (len(pics) - 1) + [hold_last_ms]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=durations, loop=0)
    return path
