"""The examples run and show what they claim."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_right_for_the_right_reasons_moves_attribution_out_of_the_mask(tmp_path):
    pytest.importorskip("sklearn")
    results = load("right_for_right_reasons").main(["--epochs", "5", "--out", str(tmp_path)])
    plain, rrr = results["plain"], results["rrr"]
    assert plain["corner_saliency_share"] > 0.05  # the plain model uses the decoy
    assert rrr["corner_saliency_share"] < 0.1 * plain["corner_saliency_share"]
    assert rrr["accuracy"] > plain["accuracy"]  # and is no longer fooled by it
    assert (tmp_path / "rrr.png").exists() and (tmp_path / "rrr.json").exists()


def test_quickstart_runs(capsys):
    load("quickstart").main()
    assert "completeness" in capsys.readouterr().out
