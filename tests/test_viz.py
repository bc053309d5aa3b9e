"""ax.viz: golden values on small arrays."""

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
