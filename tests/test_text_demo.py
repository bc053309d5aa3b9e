"""``attrax demo --text``: the synthetic task, and the fast path end to end (files and hit rates)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import attrax as ax
from attrax import cli
from attrax import text_demo as td


def test_every_sequence_holds_one_evidence_word_of_its_class():
    ids, keep, y, where = td.make_data(300, seed=5)
    first_evidence = td.FIRST_FILLER + len(td.FILLER)
    evidence = ids >= first_evidence
    assert (evidence.sum(1) == 1).all() and (evidence.float().argmax(1) == where).all()
    words = [td.VOCAB[int(i)] for i in ids[torch.arange(300), where]]
    assert all(w in td.EVIDENCE[td.CLASSES[int(c)]] for w, c in zip(words, y))
    lengths = keep.sum(1)
    assert lengths.min() >= td.MIN_LEN and lengths.max() <= td.MAX_LEN and (where < lengths).all()
    assert ((ids == 0) == (keep == 0)).all()  # <pad> exactly where the mask is 0; no <mask> in held-out data
    assert not (ids == td.MASK_ID).any()
    assert set(y.tolist()) == set(range(len(td.CLASSES)))


def test_masked_training_inputs_have_uniform_labels_where_the_evidence_is_hidden():
    ids, keep, y, where = td.make_data(2000, seed=0)
    masked, soft = td._masked(ids, keep, y, where, torch.Generator().manual_seed(0))
    hidden = masked[torch.arange(2000), where] == td.MASK_ID
    assert 0.05 < hidden.float().mean() < 0.15 and ((masked == td.MASK_ID) <= (keep == 1)).all()
    assert torch.allclose(soft[hidden], torch.full((int(hidden.sum()), len(td.CLASSES)), 1 / len(td.CLASSES)))
    assert (soft[~hidden].argmax(1) == y[~hidden]).all() and (soft.sum(1) == 1).all()


def _table(report: str) -> dict[str, tuple[float, float]]:
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \|", report, flags=re.M)
    return {name: (float(hit), float(seconds)) for name, hit, seconds in rows}


def test_fast_path_writes_the_files_and_ig_finds_the_evidence(tmp_path, capsys):
    out = tmp_path / "text"
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--text", "--out", str(out), "--steps", "150", "--samples", "64", "--show", "2",
                     "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo's single thread is given back
    for name in ("model.pt", "text.html", "text.png", "report.md"):
        assert (out / name).exists(), name
    stdout = capsys.readouterr().out
    assert "held-out accuracy: 100.0 %" in stdout and "text.html" in stdout
    hits = _table((out / "report.md").read_text())
    expected = {"gradient", "saliency", "input_x_gradient", "integrated_gradients", "deeplift", "lrp_epsilon",
                "occlusion", "feature_ablation", "shapley_sampling"}
    expected |= {f"lrp_{c}" for c in ("attn_lrp", "cp_lrp") if hasattr(ax.composites, c)}
    assert set(hits) == expected
    # acceptance (issue 17.7): IG (and AttnLRP) find the planted token in >= 90 % of samples, plain gradient does not
    gradient = hits["gradient"][0]
    assert hits["integrated_gradients"][0] >= 0.9 > gradient
    if hasattr(ax.composites, "attn_lrp"):
        assert hits["lrp_attn_lrp"][0] >= 0.9 > gradient
    assert all(seconds > 0 for _, seconds in hits.values())
    page = (out / "text.html").read_text(encoding="utf-8")
    assert page.count('<div class="row">') == 2 * (len(expected) + 1)  # per sample: the planted row, then the methods
    assert "#0 integrated_gradients" in page and ": planted</span>" in page
    with pytest.importorskip("PIL.Image").open(out / "text.png") as image:
        assert image.size[0] > 200 and image.size[1] > 200
    # a second run with the same budget reuses the weights
    model, accuracy, cached = td.train(out, 150, progress=False)
    assert cached and accuracy == 1.0


def test_functionalized_classifier_takes_embeddings_and_zeroes_padding():
    torch.manual_seed(0)
    model = td.TokenClassifier().eval()
    ids, keep, y, _ = td.make_data(4, seed=3)
    f, p = ax.functionalize(model, embedding="embed")
    x = f.embed(p, ids)
    with torch.no_grad():
        torch.testing.assert_close(f(p, x, keep), model(ids, keep))
    rel = ax.integrated_gradients(f, p, x, y, n_steps=4, additional_forward_args=(keep,)).sum(-1)
    assert (rel[keep == 0] == 0).all()
    assert td.hit_rate(torch.eye(4, td.MAX_LEN), keep, torch.arange(4)) == 1.0


@pytest.mark.parametrize("args", [["--samples", "0"], ["--show", "0"], ["--steps", "-1"]])
def test_bad_arguments_exit_with_usage(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--text", "--out", str(tmp_path), *args])
    assert e.value.code == 2 and "must be >= " in capsys.readouterr().err
    with pytest.raises(ValueError, match="samples and show must be >= 1"):
        td.run(tmp_path, samples=0)


def test_image_demo_help_names_the_text_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--text" in capsys.readouterr().out
    assert np.isfinite(td.MASK_RATE)
