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

Text. :func:`text_html` (a self-contained HTML page) and :func:`text_png` (matplotlib) colour each
token by its signed relevance, one line per sequence; :func:`generation_png` draws the
``(n_new, T)`` matrix of :func:`attrax.lm.generation` as a tokens x tokens heatmap. All three use a
diverging colormap symmetric around 0 (``bwr``: blue negative, white 0, red positive), with
:math:`c` taken per sequence (``scale="row"``) or over all of them (``scale="all"``).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "COLORMAPS", "colorize", "generation_png", "grid", "heatmap", "normalize", "overlay", "save", "text_heatmap",
    "text_html", "text_png",
]

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


def _sequences(tokens: Any, relevance: Any) -> tuple[list[list[str]], list[np.ndarray]]:
    """One sequence (``tokens`` strings, relevance ``(T,)``) or a batch (lists of strings, ``(B, T)``).

    A batch row may hold fewer tokens than ``T`` (right padding): it uses the first ``len`` values.
    """
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise TypeError(f"tokens must be a list of strings or a list of such lists, got {type(tokens).__name__}")
    rel = _array(relevance)
    batch = len(tokens) > 0 and not isinstance(tokens[0], str)
    rows = [list(map(str, t)) for t in tokens] if batch else [list(map(str, tokens))]
    if rel.ndim == 1:
        rel = rel[None]
    if rel.ndim != 2:
        raise ValueError(f"relevance must have shape (T,) or (B, T) (sum attributions over the embedding dim: "
                         f"attr.sum(-1)), got shape {rel.shape}")
    if rel.shape[0] != len(rows):
        raise ValueError(f"tokens has {len(rows)} sequences but relevance has {rel.shape[0]} rows")
    for i, row in enumerate(rows):
        if not row or len(row) > rel.shape[1]:
            raise ValueError(f"sequence {i} has {len(row)} tokens but relevance has {rel.shape[1]} values per row")
    return rows, [r[: len(row)] for r, row in zip(rel, rows)]


def _scaled(values: list[np.ndarray], percentile: float, scale: str) -> tuple[list[np.ndarray], list[float]]:
    """Values divided by their clip value (per row or over all rows), clipped to [-1, 1]; the clip values."""
    if scale not in ("row", "all"):
        raise ValueError(f"scale must be 'row' or 'all', got {scale!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if not all(np.isfinite(v).all() for v in values):
        raise ValueError("relevance must be finite")
    if scale == "all":
        clip = float(np.percentile(np.abs(np.concatenate(values)), percentile))
        clips = [clip] * len(values)
    else:
        clips = [float(np.percentile(np.abs(v), percentile)) for v in values]
    return [np.clip(v / c, -1, 1) if c > 0 else np.zeros_like(v) for v, c in zip(values, clips)], clips


def _display(token: str) -> str:
    """A token as shown: control characters spelled out (a newline token must not break the line)."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _ink(rgb: Sequence[int]) -> str:
    """Black or white text, whichever reads on the background ``rgb`` (relative luminance)."""
    return "#000" if 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2] > 110 else "#fff"


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; background: #fff; color: #000; }}
.legend {{ display: flex; align-items: center; gap: 6px; margin-bottom: 12px; font-size: 13px; }}
.bar {{ width: 160px; height: 12px; border: 1px solid #888; background: linear-gradient(to right, {gradient}); }}
.row {{ display: flex; align-items: baseline; margin: 4px 0; line-height: 1.9; }}
.label {{ flex: 0 0 auto; min-width: 8em; padding-right: 1em; font-size: 13px; color: #333; }}
.tokens {{ flex: 1 1 auto; }}
.tok {{ font-family: ui-monospace, monospace; white-space: pre; padding: 2px 3px; margin: 0 1px; border-radius: 3px; }}
</style>
</head>
<body>
<div class="legend"><span>negative</span><span class="bar"></span><span>positive</span>
<span>(relevance / {scale_note}; hover a token for its value)</span></div>
{rows}
</body>
</html>
"""


def text_html(tokens: Any, relevance: Any, path: str | os.PathLike[str] | None = None, *,
              labels: Sequence[str] | None = None, cmap: str = "bwr", percentile: float = 100.0,
              scale: str = "row", title: str = "attrax token relevance") -> str:
    """Tokens coloured by signed relevance, as one self-contained HTML page (one line per sequence).

    Relevance :math:`r` is divided by the clip value :math:`c` (the ``percentile`` of :math:`|r|`
    per sequence, or over all sequences with ``scale="all"``) and coloured from :math:`[-1, 1]`
    with a diverging map centred on 0. Token text is HTML-escaped and shown verbatim (spaces kept,
    newlines as ``\\n``); each token's raw value is its tooltip. No scripts, no external resources.

    Args:
        tokens: One sequence (a list of strings) or a batch (a list of lists; a row may be shorter
            than ``T``: its first values are used, so right-padded relevance needs no trimming).
        relevance: ``(T,)`` or ``(B, T)`` per-token relevance (``attr.sum(-1)``); numpy or torch.
        path: Where to write the page (UTF-8); ``None`` only returns it.
        labels: One label per sequence, shown before it.
        cmap: A diverging entry of :data:`COLORMAPS` (``bwr``, ``seismic``, ``coldhot``).
        percentile: Clip value as a percentile of :math:`|r|` (100: the maximum).
        scale: ``"row"`` (each sequence its own :math:`c`) or ``"all"`` (one :math:`c`).
        title: The page title.
    Returns:
        The HTML document.
    Raises:
        ValueError: If shapes disagree, ``relevance`` is not finite or an option is out of range.

    Example:
        >>> import attrax as ax
        >>> page = ax.viz.text_html(["good", "<b>"], [1.0, -1.0])
        >>> page.startswith("<!DOCTYPE html>"), "&lt;b&gt;" in page, "rgb(255,0,0)" in page
        (True, True, True)
    """
    rows, values = _sequences(tokens, relevance)
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"labels has {len(labels)} entries but there are {len(rows)} sequences")
    scaled, clips = _scaled(values, percentile, scale)
    lines = []
    for i, (row, v, raw) in enumerate(zip(rows, scaled, values)):
        spans = []
        for tok, c, r in zip(row, colorize(v, cmap, vmin=-1.0, vmax=1.0), raw):
            style = f"background-color:rgb({c[0]},{c[1]},{c[2]});color:{_ink(c)}"
            spans.append(f'<span class="tok" style="{style}" title="{r:.4g}">{html.escape(_display(tok))}</span>')
        label = "" if labels is None else f'<span class="label">{html.escape(str(labels[i]))}</span>'
        lines.append(f'<div class="row">{label}<span class="tokens">{"".join(spans)}</span></div>')
    gradient = ", ".join(f"rgb({r * 255:.0f},{g * 255:.0f},{b * 255:.0f}) {p * 100:.0f}%" for p, (r, g, b) in COLORMAPS[cmap])
    note = f"{'max' if percentile == 100 else f'p{percentile:g}'} |relevance| " + ("per line" if scale == "row" else "overall")
    page = _PAGE.format(title=html.escape(title), gradient=gradient, scale_note=note, rows="\n".join(lines))
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(page)
    return page


def _figure(width_in: float, height_in: float, dpi: int) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg canvas (no pyplot: no process-wide figure registry, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("text_png and generation_png need matplotlib: pip install 'attrax[viz]'") from e
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    return fig, FigureCanvasAgg(fig)


def _pixels(canvas: Any) -> np.ndarray:
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


#: monospace advance (DejaVu Sans Mono: 0.602 em) and line height, in points per point of font size
_CHAR, _LINE = 0.602, 1.9


def text_png(tokens: Any, relevance: Any, path: str | os.PathLike[str] | None = None, *,
             labels: Sequence[str] | None = None, cmap: str = "bwr", percentile: float = 100.0,
             scale: str = "row", width: int = 80, fontsize: float = 10.0, dpi: int = 100) -> np.ndarray:
    """Tokens coloured by signed relevance, rendered with matplotlib: an RGB ``uint8`` image.

    The same colours as :func:`text_html`; each sequence starts a new line (labels in a left
    column) and wraps at ``width`` characters. Tokens are drawn in DejaVu Sans Mono (bundled with
    matplotlib), so the layout depends only on the token lengths.

    Args:
        tokens, relevance, labels, cmap, percentile, scale: As for :func:`text_html`.
        path: Where to write the PNG; ``None`` only returns the image.
        width: Characters per line before a sequence wraps.
        fontsize: Font size in points.
        dpi: Pixels per inch.
    Returns:
        The image, ``(H, W, 3)`` ``uint8``.

    Example:
        >>> import attrax as ax
        >>> img = ax.viz.text_png(["good", "bad"], [1.0, -1.0], dpi=50)
        >>> img.dtype, img.shape[2]
        (dtype('uint8'), 3)
    """
    rows, values = _sequences(tokens, relevance)
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"labels has {len(labels)} entries but there are {len(rows)} sequences")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    scaled, _ = _scaled(values, percentile, scale)
    label_w = 0 if labels is None else max(len(str(s)) for s in labels) + 2
    cells = []  # (line, column, text, rgb) in character units
    line = 0
    for i, (row, v) in enumerate(zip(rows, scaled)):
        if labels is not None:
            cells.append((line, 0, str(labels[i]), None))
        col = 0
        for tok, c in zip(row, colorize(v, cmap, vmin=-1.0, vmax=1.0)):
            text = _display(tok)
            if col and col + len(text) + 1 > width:
                line, col = line + 1, 0
            cells.append((line, label_w + col, text, c))
            col += len(text) + 1
        line += 1
    total = max(col + len(text) + 1 for _, col, text, c in cells if c is not None) + 1  # the longest line
    char_in, line_in = _CHAR * fontsize / 72, _LINE * fontsize / 72
    fig, canvas = _figure(total * char_in, (line + 0.4) * line_in, dpi)
    axes = fig.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, total)
    axes.set_ylim(line + 0.2, -0.2)
    axes.axis("off")
    from matplotlib.patches import Rectangle

    for ln, col, text, c in cells:
        if c is None:
            axes.text(col + 0.5, ln + 0.5, text, ha="left", va="center", fontsize=fontsize, family="DejaVu Sans Mono",
                      color="#333", parse_math=False)
            continue
        axes.add_patch(Rectangle((col + 0.5, ln + 0.12), len(text) + 0.8, 0.76, facecolor=np.asarray(c) / 255,
                                 edgecolor="none"))
        axes.text(col + 0.9, ln + 0.5, text, ha="left", va="center", fontsize=fontsize, family="DejaVu Sans Mono",
                  color=_ink(c), parse_math=False)
    image = _pixels(canvas)
    if path is not None:
        save(path, image)
    return image


def generation_png(prompt_tokens: Sequence[str], new_tokens: Sequence[str], matrix: Any,
                   path: str | os.PathLike[str] | None = None, *, cmap: str = "bwr", percentile: float = 100.0,
                   scale: str = "all", causal: bool = True, cell: float = 0.3, dpi: int = 100) -> np.ndarray:
    """The generation matrix of :func:`attrax.lm.generation` as a tokens x tokens heatmap (RGB ``uint8``).

    Row ``k`` (labelled with the new token ``k``) holds the relevance of every sequence position
    for predicting that token; columns are the prompt tokens followed by the new ones (a vertical
    line marks where the prompt ends). With ``causal``, the cells a causal model cannot see
    (column ``>= len(prompt_tokens) + k``: the token itself and later ones) are grey.

    Args:
        prompt_tokens: The ``P`` prompt tokens.
        new_tokens: The ``n_new`` generated tokens.
        matrix: ``(n_new, T)`` (or ``(1, n_new, T)``) with ``P <= T <= P + n_new``: columns beyond the
            prompt are the first ``T - P`` new tokens.
        path: Where to write the PNG; ``None`` only returns the image.
        cmap, percentile: As for :func:`text_html`.
        scale: ``"all"`` (one clip value for the matrix) or ``"row"`` (each row its own).
        causal: Grey out the cells at and after each row's own position.
        cell: Cell size in inches.
        dpi: Pixels per inch.
    Returns:
        The image, ``(H, W, 3)`` ``uint8``.
    Raises:
        ValueError: If the matrix does not match the token counts.
    """
    m = _array(matrix)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    prompt, new = [_display(str(t)) for t in prompt_tokens], [_display(str(t)) for t in new_tokens]
    if m.ndim != 2 or m.shape[0] != len(new) or not len(prompt) <= m.shape[1] <= len(prompt) + len(new):
        raise ValueError(f"matrix must have shape (n_new, T) = ({len(new)}, T) with {len(prompt)} <= T <= "
                         f"{len(prompt) + len(new)} (prompt_tokens: {len(prompt)}, new_tokens: {len(new)}), "
                         f"got shape {m.shape}")
    if not prompt:
        raise ValueError("prompt_tokens must not be empty")
    n, t = m.shape
    future = np.arange(t)[None, :] >= len(prompt) + np.arange(n)[:, None]
    if causal:
        m = np.where(future, 0.0, m)  # hidden cells take no part in the scale
    scaled, clips = _scaled(list(m), percentile, scale)
    rgb = colorize(np.stack(scaled), cmap, vmin=-1.0, vmax=1.0)
    if causal:
        rgb[future] = 220
    columns = prompt + new[: t - len(prompt)]
    left = 0.07 * max(len(s) for s in new) + 0.4  # inches for the tick labels (8 pt monospace) and the axis label
    bottom = 0.07 * max(len(s) for s in columns) + 0.4
    fig, canvas = _figure(left + t * cell + 1.0, bottom + n * cell + 0.15, dpi)
    w, h = fig.get_size_inches()
    axes = fig.add_axes((left / w, bottom / h, t * cell / w, n * cell / h))
    axes.imshow(rgb, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(t), columns, rotation=90, fontsize=8, family="DejaVu Sans Mono")
    axes.set_yticks(range(n), new, fontsize=8, family="DejaVu Sans Mono")
    for label in axes.get_xticklabels() + axes.get_yticklabels():
        label.set_parse_math(False)
    axes.tick_params(length=0)
    axes.axvline(len(prompt) - 0.5, color="#000", linewidth=1.2)
    axes.set_xlabel("attributed token (prompt | generated)", fontsize=8)
    axes.set_ylabel("generated token", fontsize=8)
    bar = fig.add_axes(((left + t * cell + 0.2) / w, bottom / h, 0.12 / w, n * cell / h))
    bar.imshow(colorize(np.linspace(1, -1, 64)[:, None], cmap, vmin=-1.0, vmax=1.0), aspect="auto")
    bar.set_xticks([])
    top = "+c" if scale == "row" else f"{clips[0]:+.3g}"
    bottom = "-c" if scale == "row" else f"{-clips[0]:+.3g}"
    bar.set_yticks([0, 63], [top, bottom], fontsize=7)
    bar.yaxis.tick_right()
    image = _pixels(canvas)
    if path is not None:
        save(path, image)
    return image


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
