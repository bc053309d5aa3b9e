r"""Visualisation: attributions to images (uint8 arrays), overlays, grids, token heatmaps.

Everything here returns plain ``numpy`` ``uint8`` arrays (or an HTML string) and needs neither
matplotlib nor a display; only :func:`save` writes files (with Pillow, or matplotlib if Pillow is
missing: the optional ``viz`` extra).

Normalisation. ``heatmap`` reduces the channel dim, then maps values to colours by ``sign``:

* ``"all"`` (signed): divided by the clip value :math:`c` and mapped from :math:`[-1, 1]` with a
  diverging colormap, symmetric around 0 (0 is always the colormap's centre);
* ``"positive"`` / ``"negative"``: only values of that sign, :math:`[0, c] \to [0, 1]`;
* ``"absolute"``: :math:`|a|`, :math:`[0, c] \to [0, 1]`;

with :math:`c` the ``percentile`` of :math:`|a|` over the map (outlier clipping; 100 = the max).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["COLORMAPS", "colorize", "grid", "heatmap", "normalize", "overlay", "save", "text_heatmap"]

SIGNS = ("all", "positive", "negative", "absolute")

#: colormaps as control points (position in [0, 1], RGB in [0, 1]), interpolated linearly
COLORMAPS: dict[str, tuple[tuple[float, tuple[float, float, float]], ...]] = {
    # cold-hot (as Zennit's "coldnhot"): cyan - blue - black - red - yellow
    "coldhot": ((0.0, (0.0, 1.0, 1.0)), (0.25, (0.0, 0.0, 1.0)), (0.5, (0.0, 0.0, 0.0)), (0.75, (1.0, 0.0, 0.0)),
                (1.0, (1.0, 1.0, 0.0))),
    # blue - white - red
    "bwr": ((0.0, (0.0, 0.0, 1.0)), (0.5, (1.0, 1.0, 1.0)), (1.0, (1.0, 0.0, 0.0))),
    # dark blue - white - dark red (a "seismic"-like diverging map)
    "seismic": ((0.0, (0.0, 0.0, 0.3)), (0.25, (0.0, 0.0, 1.0)), (0.5, (1.0, 1.0, 1.0)), (0.75, (1.0, 0.0, 0.0)),
                (1.0, (0.5, 0.0, 0.0))),
    # sequential
    "hot": ((0.0, (0.0, 0.0, 0.0)), (0.375, (1.0, 0.0, 0.0)), (0.75, (1.0, 1.0, 0.0)), (1.0, (1.0, 1.0, 1.0))),
    "reds": ((0.0, (1.0, 1.0, 1.0)), (1.0, (0.6, 0.0, 0.0))),
    "blues": ((0.0, (1.0, 1.0, 1.0)), (1.0, (0.0, 0.0, 0.6))),
    "gray": ((0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))),
}


def _array(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def normalize(attr: Any, *, sign: str = "all", percentile: float = 99.5, channel_axis: int | None = 0,
              reduce: str = "sum") -> np.ndarray:
    """Attributions to values in ``[-1, 1]`` (``sign="all"``) or ``[0, 1]`` (other modes).

    Args:
        attr: ``(H, W)``, ``(C, H, W)`` (channels reduced over ``channel_axis``) or any array; a
            torch tensor is accepted.
        sign: ``all``, ``positive``, ``negative`` or ``absolute``.
        percentile: Clip value as a percentile of ``|attr|`` (100: the maximum).
        channel_axis: Axis reduced before normalising (``None``: none).
        reduce: ``sum`` or ``max_abs`` (the channel with the largest magnitude) over channels.
    """
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {', '.join(SIGNS)}; got {sign!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    a = _array(attr)
    if channel_axis is not None and a.ndim >= 3:
        if reduce == "sum":
            a = a.sum(axis=channel_axis)
        elif reduce == "max_abs":
            idx = np.abs(a).argmax(axis=channel_axis)
            a = np.take_along_axis(a, np.expand_dims(idx, channel_axis), axis=channel_axis).squeeze(channel_axis)
        else:
            raise ValueError(f"reduce must be 'sum' or 'max_abs', got {reduce!r}")
    if sign == "positive":
        a = np.clip(a, 0, None)
    elif sign == "negative":
        a = np.clip(-a, 0, None)
    elif sign == "absolute":
        a = np.abs(a)
    clip = float(np.percentile(np.abs(a), percentile)) if a.size else 0.0
    if clip <= 0:
        return np.zeros_like(a)
    lo = -1.0 if sign == "all" else 0.0
    return np.clip(a / clip, lo, 1.0)


def colorize(values: Any, cmap: str = "coldhot", *, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Map values in ``[vmin, vmax]`` through a colormap: ``(..., 3)`` ``uint8``."""
    if cmap not in COLORMAPS:
        raise ValueError(f"cmap must be one of {', '.join(COLORMAPS)}; got {cmap!r}")
    v = np.clip((_array(values) - vmin) / (vmax - vmin), 0.0, 1.0)
    points = COLORMAPS[cmap]
    xs = np.array([p for p, _ in points])
    rgb = np.stack([np.interp(v, xs, [c[i] for _, c in points]) for i in range(3)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def heatmap(attr: Any, *, sign: str = "all", percentile: float = 99.5, cmap: str | None = None,
            channel_axis: int | None = 0, reduce: str = "sum") -> np.ndarray:
    """An attribution map as an RGB ``uint8`` image ``(H, W, 3)``.

    ``cmap`` defaults to ``coldhot`` for signed maps and ``hot`` for one-sided ones.

    Example:
        >>> import numpy as np, attrax as ax
        >>> img = ax.viz.heatmap(np.array([[1.0, -1.0], [0.0, 0.5]]), percentile=100)
        >>> img.shape, img.dtype, img[1, 0].tolist()
        ((2, 2, 3), dtype('uint8'), [0, 0, 0])
    """
    values = normalize(attr, sign=sign, percentile=percentile, channel_axis=channel_axis, reduce=reduce)
    if sign == "all":
        return colorize(values, cmap or "coldhot", vmin=-1.0, vmax=1.0)
    return colorize(values, cmap or "hot")


def _rgb(image: Any) -> np.ndarray:
    """An input image as ``(H, W, 3)`` floats in [0, 1] (from CHW/HWC, gray or RGB, float or uint8)."""
    a = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if a.dtype == np.uint8:
        a = a.astype(np.float64) / 255.0
    a = a.astype(np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > 1:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a


def overlay(image: Any, heat: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """Blend a heatmap (``uint8`` RGB) over an input image: ``(1 - alpha) image + alpha heat``.

    The image may be CHW or HWC, gray or RGB, float (rescaled to [0, 1] if outside) or uint8; the
    heatmap is resized to the image by nearest neighbour when the sizes differ.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _rgb(image)
    h = np.asarray(heat).astype(np.float64) / 255.0
    if h.shape[:2] != img.shape[:2]:
        rows = (np.arange(img.shape[0]) * h.shape[0] // img.shape[0]).clip(0, h.shape[0] - 1)
        cols = (np.arange(img.shape[1]) * h.shape[1] // img.shape[1]).clip(0, h.shape[1] - 1)
        h = h[rows][:, cols]
    return np.round(((1 - alpha) * img + alpha * h) * 255).astype(np.uint8)


def grid(cells: Sequence[Sequence[np.ndarray]], *, titles: Sequence[str] | None = None, pad: int = 2,
         scale: int = 1, background: int = 255) -> np.ndarray:
    """Tile images (rows x columns of ``uint8`` RGB arrays) into one image, with column titles.

    Cells are scaled by ``scale`` (nearest neighbour) and centred in a uniform cell size; titles
    are drawn with Pillow's default font when Pillow is installed.
    """
    rows = [[np.asarray(c) for c in row] for row in cells]
    if not rows or not all(rows):
        raise ValueError("grid needs a non-empty list of non-empty rows")
    n_cols = max(len(r) for r in rows)
    cell_h = max(c.shape[0] for r in rows for c in r) * scale
    cell_w = max(c.shape[1] for r in rows for c in r) * scale
    title_h = 12 if titles else 0
    out = np.full((title_h + len(rows) * (cell_h + pad) + pad, n_cols * (cell_w + pad) + pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            c = cell if cell.ndim == 3 else np.repeat(cell[..., None], 3, axis=-1)
            c = np.repeat(np.repeat(c, scale, axis=0), scale, axis=1)
            y = title_h + pad + i * (cell_h + pad) + (cell_h - c.shape[0]) // 2
            x = pad + j * (cell_w + pad) + (cell_w - c.shape[1]) // 2
            out[y : y + c.shape[0], x : x + c.shape[1]] = c[..., :3]
    if titles:
        out = _draw_titles(out, titles, cell_w, pad)
    return out


def _draw_titles(image: np.ndarray, titles: Sequence[str], cell_w: int, pad: int) -> np.ndarray:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return image
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    for j, title in enumerate(titles):
        text = str(title)
        max_chars = max(1, cell_w // 6)
        draw.text((pad + j * (cell_w + pad) + 1, 0), text[:max_chars], fill=(0, 0, 0))
    return np.asarray(img)


def text_heatmap(tokens: Sequence[str], scores: Any, *, cmap: str = "bwr", percentile: float = 100.0) -> str:
    """Token attributions as HTML: one ``<span>`` per token with a background colour (signed scores).

    Example:
        >>> import attrax as ax
        >>> ax.viz.text_heatmap(["good", "bad"], [1.0, -1.0])
        '<span style="background-color:rgb(255,0,0)" title="1">good</span> <span style="background-color:rgb(0,0,255)" title="-1">bad</span>'
    """
    values = normalize(np.asarray(_array(scores)).reshape(-1), sign="all", percentile=percentile, channel_axis=None)
    if len(tokens) != values.size:
        raise ValueError(f"tokens has {len(tokens)} entries but scores has {values.size}")
    colors = colorize(values, cmap, vmin=-1.0, vmax=1.0)
    raw = _array(scores).reshape(-1)
    spans = [
        f'<span style="background-color:rgb({c[0]},{c[1]},{c[2]})" title="{r:.4g}">{html.escape(str(t))}</span>'
        for t, c, r in zip(tokens, colors, raw)
    ]
    return " ".join(spans)


def save(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write a ``uint8`` image as PNG (Pillow, else matplotlib)."""
    arr = np.asarray(image)
    try:
        from PIL import Image

        Image.fromarray(arr).save(path)
        return
    except ImportError:
        pass
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - both missing
        raise ImportError("saving images needs Pillow or matplotlib: pip install 'attrax[viz]'") from e
    plt.imsave(path, arr)
