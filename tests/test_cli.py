"""The attrax command line, run as a user would (subprocesses)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PIL")

MODELS = '''
import torch
def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 3))
def images():
    g = torch.Generator().manual_seed(3)
    return torch.utils.data.TensorDataset(torch.randn(30, 3, 12, 12, generator=g), torch.randint(0, 3, (30,), generator=g))
'''


def run(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-m", "attrax", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("cli")
    (d / "mymodels.py").write_text(MODELS)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray((rng.random((12, 12, 3)) * 255).astype("uint8")).save(d / f"{name}.png")
    np.save(d / "c.npy", rng.random((3, 12, 12)).astype("float32"))
    (d / "bad.png").write_text("not an image")
    import torch

    torch.manual_seed(1)
    import importlib.util

    spec = importlib.util.spec_from_file_location("mymodels", d / "mymodels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.tiny().state_dict(), d / "w.pt")
    return d


def test_factory_model_and_png_inputs_produce_heatmaps(workdir):
    r = run(["explain", "--model", "mymodels:tiny", "--weights", "w.pt", "--input", "a.png", "b.png",
             "--method", "integrated_gradients", "--opt", "n_steps=8", "--target", "0,2", "--out", "out"], workdir)
    assert r.returncode == 0, r.stderr
    for stem in ("a", "b"):
        for suffix in (".png", "_overlay.png", ".npy"):
            assert (workdir / "out" / f"{stem}_integrated_gradients{suffix}").exists()
    attr = np.load(workdir / "out" / "a_integrated_gradients.npy")
    assert attr.shape == (3, 12, 12) and np.isfinite(attr).all()


def test_options_composites_and_npy_inputs(workdir):
    r = run(["explain", "--model", "mymodels:tiny", "--input", "a.png", "c.npy", "--method", "lrp",
             "--opt", "composite=epsilon_plus_flat", "--out", "out2"], workdir)
    assert r.returncode == 0, r.stderr
    r = run(["explain", "--model", "mymodels:tiny", "--input", "a.png", "--method", "occlusion", "--opt", "window=3,4,4",
             "--opt", "stride=3,2,2", "--normalize", "0.5,0.25", "--out", "out3"], workdir)
    assert r.returncode == 0, r.stderr


def test_exported_program_model(workdir):
    import torch

    sys.path.insert(0, str(workdir))
    try:
        import mymodels
    finally:
        sys.path.remove(str(workdir))
    ep = torch.export.export(mymodels.tiny().eval(), (torch.randn(1, 3, 12, 12),))
    torch.export.save(ep, workdir / "tiny.pt2")
    r = run(["explain", "--model", "tiny.pt2", "--input", "a.png", "--method", "saliency", "--out", "out4"], workdir)
    assert r.returncode == 0, r.stderr
    assert (workdir / "out4" / "a_saliency.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "lrp", "--opt", "foo=1"], "method lrp has no option 'foo'"),
        (["--method", "lrp", "--opt", "composite=zzz"], "unknown composite 'zzz'"),
        (["--method", "integrated_gradients", "--opt", "n_steps=0"], "n_steps must be >= 1"),
        (["--method", "lrp", "--input", "missing.png"], "cannot read input 'missing.png'"),
        (["--method", "lrp", "--input", "bad.png"], "cannot read input 'bad.png'"),
        (["--method", "lrp", "--gray"], "does not fit the model"),
        (["--method", "lrp", "--input", "a.png", "c.npy", "--resize", "8,8"], None),
        (["--method", "lrp", "--target", "9"], "out of range"),
        (["--method", "lrp", "--model", "nomod:f"], "cannot import 'nomod'"),
        (["--method", "lrp", "--weights", "a.png"], "cannot read --weights"),
        (["--method", "lrp", "--resize", "4"], "--resize expects H,W"),
        (["--method", "lrp", "--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(workdir, args, message):
    base = {"--model": "mymodels:tiny", "--input": "a.png"}
    full = ["explain"]
    for k, v in base.items():
        if k not in args:
            full += [k, v]
    r = run(full + args, workdir)
    if message is None:  # .npy inputs are not resized: a shape mismatch between inputs, still one line
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
        return
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_negative_target_and_layer_path_option(workdir):
    # issue 15.21: `--target -1,0` was refused (argparse, then the range check) and `--opt layer=0` became int 0
    import torch

    import attrax as ax
    from attrax.cli import _load_tensor

    r = run(["explain", "--model", "mymodels:tiny", "--input", "a.png", "b.png", "--method", "grad_cam",
             "--opt", "layer=0", "--target", "-1,0", "--out", "neg"], workdir)
    assert r.returncode == 0, r.stderr
    sys.path.insert(0, str(workdir))
    try:
        import mymodels
    finally:
        sys.path.remove(str(workdir))
    f, p = ax.functionalize(mymodels.tiny().eval())
    x = torch.stack([_load_tensor(workdir / "a.png"), _load_tensor(workdir / "b.png")])
    expect = ax.layer.grad_cam(f, p, x, torch.tensor([2, 0]), "0")  # -1 is the last of 3 classes
    for i, stem in enumerate("ab"):
        np.testing.assert_allclose(np.load(workdir / "neg" / f"{stem}_grad_cam.npy"), expect[i].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--normalize", "abc"], "--normalize expects 'mean,std' or 'm1,m2,m3;s1,s2,s3' (finite numbers, std > 0), got 'abc'"),
        (["--normalize", "0.5;0.2;1"], "--normalize expects 'mean,std' or 'm1,m2,m3;s1,s2,s3'"),
        (["--normalize", "0.5,0.2,0.1;0.1"], "--normalize expects 'mean,std' or 'm1,m2,m3;s1,s2,s3'"),
        (["--normalize", "0.5,0"], "--normalize expects 'mean,std' or 'm1,m2,m3;s1,s2,s3'"),
        (["--normalize", "0.5,0.5;0.2,0.2"], "--normalize gives 2 means and stds for inputs with 3 channels"),
        (["--target", "-4"], "--target [-4] out of range for model output of shape (1, 3) (expected -3..2"),
    ],
)
def test_bad_normalize_and_target_exit_2_naming_the_option(workdir, monkeypatch, capsys, args, message):
    # issue 15.21: a bad --normalize ended in "ValueError: could not convert string to float", or was half ignored
    from attrax.cli import main

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI makes the working directory importable
    with pytest.raises(SystemExit) as e:
        main(["explain", "--model", "mymodels:tiny", "--input", "a.png", "--method", "saliency", "--out", "o", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_explain_dataset_single_and_torchrun(workdir):
    import torch

    import attrax as ax

    r = run(["explain-dataset", "--model", "mymodels:tiny", "--weights", "w.pt", "--dataset", "mymodels:images",
             "--method", "integrated_gradients", "--opt", "n_steps=8", "--batch-size", "4", "--shard-size", "8",
             "--out", "ds1", "--no-progress"], workdir)
    assert r.returncode == 0, r.stderr
    assert "30 attributions of 30 samples" in r.stdout and "(complete)" in r.stdout
    one = ax.distributed.open_store(workdir / "ds1")
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "attrax",
                        "explain-dataset", "--model", "mymodels:tiny", "--weights", "w.pt", "--dataset", "mymodels:images",
                        "--method", "integrated_gradients", "--opt", "n_steps=8", "--batch-size", "4", "--shard-size", "8",
                        "--out", "ds2", "--no-progress"], cwd=workdir, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    two = ax.distributed.open_store(workdir / "ds2")
    assert two.complete and np.array_equal(one.ids, two.ids)
    np.testing.assert_allclose(np.asarray(one.attributions), np.asarray(two.attributions), rtol=1e-6, atol=1e-7)
    # a .pt dataset file
    data = {"x": torch.randn(5, 3, 12, 12), "target": torch.tensor([0, 1, 2, 0, 1])}
    torch.save(data, workdir / "data.pt")
    r = run(["explain-dataset", "--model", "mymodels:tiny", "--dataset", "data.pt", "--method", "saliency", "--out", "ds3"], workdir)
    assert r.returncode == 0, r.stderr
    assert ax.distributed.open_store(workdir / "ds3").attributions.shape == (5, 3, 12, 12)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "nomod:f"], "cannot import 'nomod' for --dataset"),
        (["--dataset", "missing.pt"], "cannot read dataset file 'missing.pt'"),
        (["--dataset", "plain"], "--dataset must be 'package.module:factory' or a .pt file"),
        (["--method", "grad_cam"], "unknown method 'grad_cam' for explain-dataset"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--opt", "n_steps=0"], "n_steps must be >= 1"),
    ],
)
def test_explain_dataset_bad_arguments(workdir, args, message):
    base = {"--model": "mymodels:tiny", "--dataset": "mymodels:images", "--method": "integrated_gradients", "--out": "bad"}
    full = ["explain-dataset"]
    for k, v in base.items():
        if k not in args:
            full += [k, v]
    r = run(full + args, workdir)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_demo_runs_end_to_end_on_a_reduced_budget(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "attrax", "demo", "--out", str(out), "--samples", "2", "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (out / "grid.png").exists() and (out / "report.md").exists() and (out / "model.pt").exists()
    line = next(l for l in r.stdout.splitlines() if l.startswith("held-out accuracy"))
    assert float(line.split(":")[1].strip().split()[0]) >= 95.0
    report = (out / "report.md").read_text()
    assert "Spearman" in report and "deeplift" in report and "| lrp_epsilon_plus_flat |" in report
    # a second run reuses the cached model
    r2 = subprocess.run([sys.executable, "-m", "attrax", "demo", "--out", str(out), "--samples", "2", "--no-progress"],
                        capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and "(cached model)" in (out / "report.md").read_text()
