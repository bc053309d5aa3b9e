"""ax.viz: golden values on small arrays."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import attrax as ax

A = np.array([[2.0, -1.0], [0.0, 4.0]])


def test_normalize_sign_modes_and_clipping():
    # signed: divided by the clip value (here max |a| = 4), symmetric around 0
    np.testing.assert_allclose(ax.viz.normalize(A, percentile=100), [[0.5, -0.25], [0.0, 1.0]])
    np.testing.assert_allclose(ax.viz.normalize(A, sign="positive", percentile=100), [[0.5, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(ax.viz.normalize(A, sign="negative", percentile=100), [[0.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(ax.viz.normalize(A, sign="absolute", percentile=100), [[0.5, 0.25], [0.0, 1.0]])
    # outlier clipping: the 50th percentile of |a| = (1 + 2) / 2 = 1.5 becomes the clip value
    np.testing.assert_allclose(ax.viz.normalize(A, percentile=50), [[1.0, -2 / 3], [0.0, 1.0]])
    # channels are summed first; torch tensors are accepted
    chw = torch.tensor([[[1.0, -1.0]], [[1.0, 0.0]]])
    np.testing.assert_allclose(ax.viz.normalize(chw, percentile=100), [[1.0, -0.5]])
    assert (ax.viz.normalize(np.zeros((2, 2))) == 0).all()


def test_colormaps_golden_values():
    # coldhot: -1 cyan, -0.5 blue, 0 black, 0.5 red, 1 yellow
    img = ax.viz.heatmap(np.array([[-1.0, -0.5, 0.0, 0.5, 1.0]]), percentile=100, channel_axis=None)
    assert img.tolist() == [[[0, 255, 255], [0, 0, 255], [0, 0, 0], [255, 0, 0], [255, 255, 0]]]
    # bwr: blue - white - red, halfway between white and red at 0.5
    img = ax.viz.heatmap(np.array([[-1.0, 0.0, 0.5]]), percentile=100, cmap="bwr", channel_axis=None)
    assert img.tolist() == [[[0, 0, 255], [255, 255, 255], [255, 128, 128]]]
    # one-sided maps default to "hot": 0 black, 1 white
    img = ax.viz.heatmap(np.array([[0.0, 4.0]]), sign="absolute", percentile=100, channel_axis=None)
    assert img.tolist() == [[[0, 0, 0], [255, 255, 255]]]
    assert ax.viz.colorize(np.array([0.5]), "gray").tolist() == [[128, 128, 128]]


def test_overlay_blends_and_resizes():
    image = np.zeros((4, 4), dtype=np.float64)  # black, gray
    heat = np.full((2, 2, 3), 200, dtype=np.uint8)
    out = ax.viz.overlay(image, heat, alpha=0.25)
    assert out.shape == (4, 4, 3) and (out == 50).all()
    chw = torch.ones(3, 2, 2)
    assert (ax.viz.overlay(chw, np.zeros((2, 2, 3), np.uint8), alpha=0.5) == 128).all()


def test_grid_layout():
    a = np.zeros((2, 2, 3), np.uint8)
    b = np.full((2, 2, 3), 9, np.uint8)
    g = ax.viz.grid([[a, b], [b, a]], pad=1)
    assert g.shape == (1 + 2 * 3, 1 + 2 * 3, 3)
    assert (g[1:3, 1:3] == 0).all() and (g[1:3, 4:6] == 9).all() and (g[4:6, 1:3] == 9).all()
    assert (g[0] == 255).all()  # padding
    titled = ax.viz.grid([[a, b]], titles=["x", "y"], scale=4)
    assert titled.shape[0] == 12 + 8 + 2 * 2


def test_text_heatmap_html():
    html = ax.viz.text_heatmap(["good", "<b>", "meh"], [2.0, -2.0, 0.0])
    assert html.count("<span") == 3 and "&lt;b&gt;" in html
    assert 'rgb(255,0,0)' in html and 'rgb(0,0,255)' in html and 'rgb(255,255,255)' in html


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ax.viz.heatmap(A, sign="both"), "sign must be one of"),
        (lambda: ax.viz.heatmap(A, cmap="jet"), "cmap must be one of"),
        (lambda: ax.viz.normalize(A, percentile=0), "percentile must be in"),
        (lambda: ax.viz.overlay(A, np.zeros((2, 2, 3), np.uint8), alpha=2), "alpha must be in"),
        (lambda: ax.viz.text_heatmap(["a"], [1.0, 2.0]), "tokens has 1 entries"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_save_roundtrip(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    img = ax.viz.heatmap(A, percentile=100)
    ax.viz.save(tmp_path / "h.png", img)
    assert np.array_equal(np.asarray(pil.open(tmp_path / "h.png")), img)


# ------------------------------------------------------------------ text: HTML, PNG, generation matrix

GOLDEN = Path(__file__).parent / "golden"


def test_text_html_structure_and_escaping(tmp_path):
    tokens = [["good", "<script>alert(1)</script>", "a&b", '"q"'], ["bad", "\n", " x"]]
    rel = torch.tensor([[2.0, -2.0, 0.0, 1.0], [-1.0, 0.5, 0.0, 99.0]])  # row 1: 3 tokens, a padded 4th value
    page = ax.viz.text_html(tokens, rel, tmp_path / "t.html", labels=["<one>", "two"], title="a <title>")
    assert (tmp_path / "t.html").read_text(encoding="utf-8") == page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert '<meta charset="utf-8">' in page and "<title>a &lt;title&gt;</title>" in page
    # self-contained and inert: no scripts, no external resources; token and label text escaped
    assert "<script" not in page and "src=" not in page and "href=" not in page and "@import" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a&amp;b" in page and "&quot;q&quot;" in page
    assert '<span class="label">&lt;one&gt;</span>' in page
    assert page.count('<div class="row">') == 2 and page.count('class="tok"') == 7
    assert ">\\n</span>" in page and "> x</span>" in page  # a newline token is spelled out, spaces kept
    # per-row scale: row 0 max |r| = 2, row 1 max |r| = 1 (the padded 99 is not one of its tokens)
    spans = re.findall(r'background-color:rgb\((\d+),(\d+),(\d+)\);color:(#\w+)" title="([^"]+)">', page)
    colors = [tuple(map(int, s[:3])) for s in spans]
    assert colors[:4] == [(255, 0, 0), (0, 0, 255), (255, 255, 255), (255, 128, 128)]
    assert colors[4:] == [(0, 0, 255), (255, 128, 128), (255, 255, 255)]
    assert [s[3] for s in spans[:3]] == ["#fff", "#fff", "#000"]  # ink readable on the background
    assert [s[4] for s in spans[:4]] == ["2", "-2", "0", "1"]  # raw values as tooltips
    # one clip value over all rows: row 1's -1 is half of row 0's 2
    shared = ax.viz.text_html(tokens, rel, scale="all")
    assert "rgb(127,127,255)" in shared or "rgb(128,128,255)" in shared
    # a single sequence: (T,) relevance, numpy accepted
    single = ax.viz.text_html(["a", "b"], np.array([0.0, -3.0]))
    assert single.count('<div class="row">') == 1 and "rgb(0,0,255)" in single


def _golden(name: str, image: np.ndarray) -> None:
    """``image`` matches ``tests/golden/<name>`` up to anti-aliasing: ATTRAX_UPDATE_GOLDEN=1 rewrites it."""
    pil = pytest.importorskip("PIL.Image")
    path = GOLDEN / name
    if os.environ.get("ATTRAX_UPDATE_GOLDEN"):
        ax.viz.save(path, image)
    with pil.open(path) as im:
        want = np.asarray(im.convert("RGB")).astype(int)
    assert image.shape == want.shape, f"{name}: shape {image.shape}, golden {want.shape}"
    diff = np.abs(image.astype(int) - want).max(-1)
    # text rendering may move by a pixel across matplotlib/FreeType versions; colours and layout may not
    assert diff.mean() < 2.0 and (diff > 64).mean() < 0.01, (name, diff.mean(), (diff > 64).mean())


def test_text_png_golden():
    pytest.importorskip("matplotlib")
    image = ax.viz.text_png([["good", "bad", "so-so"], ["<x>", "$y$"]], [[2.0, -2.0, 0.5], [-1.0, 1.0, 0.0]],
                            labels=["A", "BB"], dpi=60)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    flat = image.reshape(-1, 3)
    red, blue = (flat == (255, 0, 0)).all(1), (flat == (0, 0, 255)).all(1)
    assert red.sum() > 50 and blue.sum() > 50  # the +max and -max tokens, in the diverging map's end colours
    _golden("text_png.png", image)


def test_text_png_wraps_long_sequences_and_writes(tmp_path):
    pytest.importorskip("matplotlib")
    tokens = ["word"] * 12
    one_line = ax.viz.text_png(tokens, np.ones(12), width=80, dpi=40)
    wrapped = ax.viz.text_png(tokens, np.ones(12), tmp_path / "w.png", width=20, dpi=40)
    assert wrapped.shape[0] > 2 * one_line.shape[0] and wrapped.shape[1] < one_line.shape[1]
    assert (tmp_path / "w.png").exists()


def test_generation_png_golden(tmp_path):
    pytest.importorskip("matplotlib")
    m = np.array([[1.0, -0.5, 0.0, 9.0, 9.0], [0.25, -1.0, 0.5, 0.0, 9.0]])  # 9: cells a causal model cannot see
    image = ax.viz.generation_png(["The", "cat"], ["sat", "down"], m[:, :4], tmp_path / "g.png", dpi=50)
    assert (tmp_path / "g.png").exists()
    flat = image.reshape(-1, 3)
    assert (flat == (255, 0, 0)).all(1).sum() > 50 and (flat == (0, 0, 255)).all(1).sum() > 50
    assert (flat == (220, 220, 220)).all(1).sum() > 50  # the greyed future cells
    _golden("generation_png.png", image)
    # (1, n_new, T) from ax.lm.generation; T may include every new token
    assert ax.viz.generation_png(["The", "cat"], ["sat", "down"], m[None, :, :4], dpi=50).shape == image.shape
    assert ax.viz.generation_png(["The", "cat", "x"], ["sat", "down"], m, dpi=50).ndim == 3


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="needs a headless chromium")
def test_text_html_screenshot_shows_coloured_tokens(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    page = tmp_path / "t.html"
    ax.viz.text_html([["plus", "minus", "zero", "half"]], [[1.0, -1.0, 0.0, 0.5]], page)
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=600,200", f"--screenshot={shot}", page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not shot.exists():
        pytest.skip(f"chromium made no screenshot (exit {r.returncode}): {r.stderr[-300:]}")
    with pil.open(shot) as im:
        img = np.asarray(im.convert("RGB")).astype(int)

    def columns(rgb):
        """x of the pixels in solid boxes of colour rgb (rows with >= 15 such pixels: token boxes, not the
        legend's gradient bar, where an exact colour spans a pixel or two)."""
        hit = (np.abs(img - np.array(rgb)) <= 2).all(-1)
        hit[hit.sum(1) < 15] = False
        assert hit.sum() > 100, f"no token box coloured {rgb} in the screenshot"
        return np.nonzero(hit)[1]

    red, blue, pink = columns((255, 0, 0)), columns((0, 0, 255)), columns((255, 128, 128))
    # in token order, left to right (medians: anti-aliased text edges can hit a colour elsewhere)
    assert np.median(red) < np.median(blue) < np.median(pink)


@pytest.mark.parametrize(
    "call, match, error",
    [
        (lambda: ax.viz.text_html(["a", "b"], [1.0]), "sequence 0 has 2 tokens but relevance has 1", ValueError),
        (lambda: ax.viz.text_html([["a"], ["b"]], [1.0]), "tokens has 2 sequences but relevance has 1 rows", ValueError),
        (lambda: ax.viz.text_html(["a"], np.ones((1, 1, 1))), r"attr.sum\(-1\)", ValueError),
        (lambda: ax.viz.text_html("ab", [1.0, 2.0]), "tokens must be a list of strings", TypeError),
        (lambda: ax.viz.text_html(["a"], [1.0], labels=["x", "y"]), "labels has 2 entries", ValueError),
        (lambda: ax.viz.text_html(["a"], [1.0], scale="col"), "scale must be 'row' or 'all'", ValueError),
        (lambda: ax.viz.text_html(["a"], [float("nan")]), "relevance must be finite", ValueError),
        (lambda: ax.viz.text_html(["a"], [1.0], cmap="jet"), "cmap must be one of", ValueError),
        (lambda: ax.viz.text_png(["a"], [1.0], width=0), "width must be >= 1", ValueError),
        (lambda: ax.viz.generation_png(["a"], ["b", "c"], np.ones((2, 4))), r"matrix must have shape \(n_new, T\)", ValueError),
    ],
)
def test_text_bad_arguments(call, match, error):
    with pytest.raises(error, match=match):
        call()
