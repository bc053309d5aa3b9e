"""Dataset-scale attribution: torchrun sharding, atomic resumable store, reading back."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import attrax as ax
from _dataset_job import model_and_data

JOB = str(Path(__file__).with_name("_dataset_job.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


def run_job(out, *args, procs=1, wait=True, **popen):
    cmd = [sys.executable, JOB, str(out), *args]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *cmd[1:]]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    if not wait:
        return p
    output, _ = p.communicate(timeout=300)
    assert p.returncode == 0, output
    return output


def same_store(a, b):
    assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.targets, b.targets)
    assert np.array_equal(a.delta, b.delta)
    assert a.attributions.dtype == b.attributions.dtype
    assert np.array_equal(np.asarray(a.attributions), np.asarray(b.attributions))  # bit for bit
    assert a.manifest == b.manifest


def index_is_consistent(out: Path) -> int:
    """Every shard in the index (json present) is complete; returns how many there are."""
    count = 0
    for meta in out.glob("shard-*.json"):
        info = json.loads(meta.read_text())
        rows = np.load(out / info["file"], allow_pickle=False)
        assert rows.shape == (len(info["ids"]), 1, 8, 8), meta
        assert np.isfinite(rows).all()
        count += 1
    return count


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_job(out)
    return ax.distributed.open_store(out)


def test_single_process_store_holds_everything(reference):
    assert reference.complete and len(reference) == 200
    assert np.array_equal(np.sort(reference.ids), np.arange(200))
    net, ds = model_and_data()
    f, p = ax.functionalize(net)
    x, t = ds.tensors
    expect = ax.integrated_gradients(f, p, x, t, n_steps=16)
    np.testing.assert_allclose(np.asarray(reference.attributions)[np.argsort(reference.ids)], expect.numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(reference.targets, t.numpy()[reference.ids])
    delta = ax.metrics.completeness_delta(f, p, x, t, expect)
    np.testing.assert_allclose(reference.delta, delta.numpy()[reference.ids], rtol=1e-4, atol=1e-5)
    assert reference.manifest["method"] == "attrax.gradients.integrated_gradients"
    assert reference.manifest["options"] == {"n_steps": 16}


def test_torchrun_two_ranks_equal_single_process_bit_for_bit(reference, tmp_path):
    run_job(tmp_path, procs=2)
    store = ax.distributed.open_store(tmp_path)
    assert store.complete
    assert len(store.ids) == len(np.unique(store.ids)) == 200  # each sample exactly once
    same_store(store, reference)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_sigkill_one_rank_then_resume_equals_uninterrupted(reference, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    out = tmp_path / "store"
    job = run_job(out, "--delay", "0.25", "--pid-dir", str(pids), procs=2, wait=False)
    deadline = time.monotonic() + 120
    killed = False
    while job.poll() is None and time.monotonic() < deadline:
        done = index_is_consistent(out) if out.exists() else 0  # never a partial shard in the index
        if not killed and done >= 2 and (pids / "rank-1.pid").exists():
            os.kill(int((pids / "rank-1.pid").read_text()), signal.SIGKILL)
            killed = True
        time.sleep(0.02)
    job.communicate(timeout=60)
    assert killed and job.returncode != 0
    index_is_consistent(out)
    partial = ax.distributed.open_store(out)
    assert not partial.complete and 0 < len(partial) < 200
    assert len(partial.missing) + len(partial) == 200
    # resume with a different number of processes: only the missing shards are computed
    run_job(out)
    resumed = ax.distributed.open_store(out)
    assert resumed.complete
    same_store(resumed, reference)
    assert not list(out.glob("*.tmp-*"))


def test_torchrun_ranks_with_different_weights_are_refused(tmp_path):
    # issue 15.4: rank 1 without the checkpoint would have mixed its attributions into the store
    p = run_job(tmp_path / "store", "--perturb-rank", "1", procs=2, wait=False)
    output, _ = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "the ranks disagree: different model" in output and "on rank 0 vs" in output and "on rank 1" in output
    assert not list((tmp_path / "store").glob("shard-*"))


# ------------------------------------------------------------------------- in process


def small_job():
    net, ds = model_and_data(60)
    f, p = ax.functionalize(net)
    return f, p, ds


def test_resume_recomputes_only_unfinished_shards_and_seeded_noise_is_reproducible(tmp_path):
    f, p, ds = small_job()
    calls = []

    def counted(*a, **k):
        calls.append(len(a[2]))
        return ax.smoothgrad(*a, **k)

    counted.__qualname__, counted.__module__ = "smoothgrad", "attrax.gradients"
    kw = dict(out=tmp_path, batch_size=8, shard_size=16, n_samples=3, stdev=0.2, seed=3, progress=False)
    first = ax.distributed.attribute_dataset(counted, f, p, ds, **kw)
    assert calls[0] == 1 and sum(calls[1:]) == 60 and first.complete  # a one-sample probe checks the options first
    reference = np.asarray(first.attributions).copy()
    # a crash after shard 1's array but before its index entry, and a stale temporary file
    (tmp_path / "shard-00001.json").unlink()
    (tmp_path / "shard-00002.npy.tmp-999").write_bytes(b"partial")
    assert not ax.distributed.open_store(tmp_path).complete
    calls.clear()
    again = ax.distributed.attribute_dataset(counted, f, p, ds, **kw)
    assert calls == [1, 8, 8] and again.complete
    assert np.array_equal(np.asarray(again.attributions), reference)
    assert not list(tmp_path.glob("*.tmp-*"))
    # nothing to do on a complete store
    calls.clear()
    ax.distributed.attribute_dataset(counted, f, p, ds, **kw)
    assert calls == [1]


def test_completeness_gap_with_baseline_distribution(tmp_path):
    f, p, ds = small_job()
    base = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    store = ax.distributed.attribute_dataset(ax.deeplift_shap, f, p, ds, out=tmp_path, batch_size=16, baselines=base, progress=False)
    assert np.abs(store.delta).max() < 1e-4  # DeepLiftShap sums to f(x) - mean f(baselines)
    assert store.manifest["options"]["baselines"]["tensor"] == [4, 1, 8, 8]
    no_delta = ax.distributed.attribute_dataset(ax.saliency, f, p, ds, out=tmp_path / "s", completeness=False, progress=False)
    assert np.isnan(no_delta.delta).all()


def test_store_rows_index_like_an_array(tmp_path):
    f, p, ds = small_job()
    store = ax.distributed.attribute_dataset(ax.saliency, f, p, ds, out=tmp_path, batch_size=7, shard_size=11, progress=False)
    full = np.asarray(store.attributions)
    assert full.shape == (60, 1, 8, 8) and store.attributions.shape == full.shape and len(store.attributions) == 60
    assert np.array_equal(store.attributions[13], full[13])
    assert np.array_equal(store.attributions[-1], full[-1])
    assert np.array_equal(store.attributions[5:40], full[5:40])
    assert np.array_equal(store.attributions[50:5:-3], full[50:5:-3])
    assert np.array_equal(store.attributions[[0, 59, 11, 11]], full[[0, 59, 11, 11]])
    mask = np.arange(60) % 7 == 0
    assert np.array_equal(store.attributions[mask], full[mask])
    assert np.array_equal(store.attributions[2:4, 0, 1], full[2:4, 0, 1])
    with pytest.raises(IndexError):
        store.attributions[60]
    expect = ax.saliency(f, p, ds.tensors[0], ds.tensors[1])
    np.testing.assert_allclose(full, expect.numpy(), rtol=1e-6, atol=1e-7)


def test_other_options_refuse_to_mix_into_a_store(tmp_path):
    f, p, ds = small_job()
    ax.distributed.attribute_dataset(ax.integrated_gradients, f, p, ds, out=tmp_path, n_steps=4, progress=False)
    with pytest.raises(ValueError, match="different options"):
        ax.distributed.attribute_dataset(ax.integrated_gradients, f, p, ds, out=tmp_path, n_steps=8, progress=False)
    with pytest.raises(ValueError, match="different method, options"):
        ax.distributed.attribute_dataset(ax.saliency, f, p, ds, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="n_steps must be >= 1"):  # checked on one sample before anything is written
        ax.distributed.attribute_dataset(ax.integrated_gradients, f, p, ds, out=tmp_path / "new", n_steps=0, progress=False)
    assert not (tmp_path / "new").exists()


def test_resume_with_other_weights_or_data_is_refused_naming_both_values(tmp_path):
    # issue 15.4: these resumes used to go on silently and mix two models or datasets in one store
    f, p, ds = small_job()
    kw = dict(out=tmp_path, batch_size=8, shard_size=16, progress=False)
    store = ax.distributed.attribute_dataset(ax.saliency, f, p, ds, **kw)
    (tmp_path / "shard-00001.json").unlink()  # half done
    before = sorted(q.name for q in tmp_path.iterdir())
    other = {k: v.clone() for k, v in p.items()}
    with torch.no_grad():
        other["0.bias"][0] += 1e-3
    theirs = ax.distributed.attribute_dataset  # same call, other weights
    with pytest.raises(ValueError, match="different model: model") as e:
        theirs(ax.saliency, f, other, ds, **kw)
    old_sha = store.manifest["model"]["sha256"]
    new_sha = ax.distributed._model_fingerprint(other)["sha256"]
    assert old_sha in str(e.value) and new_sha in str(e.value) and old_sha != new_sha
    x, t = ds.tensors
    edited = x.clone()
    edited[0, 0, 0, 0] += 1.0
    with pytest.raises(ValueError, match=r"different dataset: dataset \{.*in the store vs \{.*in this call"):
        theirs(ax.saliency, f, p, torch.utils.data.TensorDataset(edited, t), **kw)
    with pytest.raises(ValueError, match="different dataset, n: .*n 60 in the store vs 59 in this call"):
        theirs(ax.saliency, f, p, torch.utils.data.TensorDataset(x[:59], t[:59]), **kw)
    with pytest.raises(ValueError, match="different method: method \"attrax.gradients.saliency\" in the store vs "
                                         "\"attrax.gradients.input_x_gradient\" in this call"):
        theirs(ax.input_x_gradient, f, p, ds, **kw)
    with pytest.raises(ValueError, match="different options: options \\{\\} in the store vs \\{\"abs\": false\\}"):
        theirs(ax.saliency, f, p, ds, abs=False, **kw)
    assert sorted(q.name for q in tmp_path.iterdir()) == before  # nothing written by the refused calls
    # equal weights in other tensors resume
    resumed = theirs(ax.saliency, f, {k: v.clone() for k, v in p.items()}, ds, **kw)
    assert resumed.complete
    # caller-given ids replace the fingerprints
    ids = dict(kw, out=tmp_path / "ids", model_id="net-v1", dataset_id="digits-60")
    assert theirs(ax.saliency, f, p, ds, **ids).manifest["model"] == {"id": "net-v1"}
    with pytest.raises(ValueError, match='different model: model {"id": "net-v1"} in the store vs {"id": "net-v2"}'):
        theirs(ax.saliency, f, p, ds, **dict(ids, model_id="net-v2"))
    with pytest.raises(TypeError, match="model_id must be a non-empty str"):
        theirs(ax.saliency, f, p, ds, **dict(ids, model_id=3))


def test_model_fingerprint_covers_buffers_and_names():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    _, p = ax.functionalize(net)
    base = ax.distributed._model_fingerprint(p)
    assert base["tensors"] == len(p) == 7  # weight, bias, weight, bias, running_mean, running_var, num_batches_tracked
    moved = dict(p, **{"1.running_mean": p["1.running_mean"] + 1})
    renamed = {("x" + k if k == "0.bias" else k): v for k, v in p.items()}
    assert ax.distributed._model_fingerprint(moved) != base
    assert ax.distributed._model_fingerprint(renamed) != base
    assert ax.distributed._model_fingerprint({k: v.clone() for k, v in p.items()}) == base


def tiny_data(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_resume_with_a_changed_module_or_another_model_function_is_refused(tmp_path):
    # review of 15.4: only params were fingerprinted, so the same weights in a changed module, and
    # any plain function (params == {}) for any other, resumed a store and mixed two models in it
    ds = tiny_data()
    run = lambda model, out, **k: ax.distributed.attribute_dataset(  # noqa: E731
        ax.saliency, *ax.functionalize(model), ds, out=tmp_path / out, batch_size=4, shard_size=4, progress=False, **k)
    half_done = lambda out: (tmp_path / out / "shard-00001.json").unlink()  # noqa: E731
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LeakyReLU(0.1), torch.nn.Linear(6, 3)).eval()
    run(net, "m")
    half_done("m")
    net[1].negative_slope = 0.9
    with pytest.raises(ValueError, match=r'different model: model \{.*"structure"'):
        run(net, "m")
    net[1].negative_slope = 0.1
    with pytest.raises(ValueError, match="different model: model"):  # a swapped activation, same names and weights
        run(torch.nn.Sequential(net[0], torch.nn.ReLU(), net[2]).eval(), "m")
    with pytest.raises(ValueError, match="different model: model"):  # same module in training mode
        run(net.train(), "m")
    assert run(net.eval(), "m").complete  # the same module resumes
    W1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    W2 = W1 + 1
    run(lambda p, x: x @ W1, "f")
    half_done("f")
    for other in (lambda p, x: x @ W2, lambda p, x: (x @ W1).relu(), lambda p, x, s=2.0: s * (x @ W1), lambda p, x: net(x)):
        with pytest.raises(ValueError, match="different model: model"):
            run(other, "f")
    W1_again = W1.clone()  # equal contents under another name: the same function
    assert run(lambda p, x: x @ W1_again, "f").complete
    # a module inside a plain function counts with its weights
    run(lambda p, x: net(x), "g")
    half_done("g")
    with torch.no_grad():
        net[2].bias[0] += 1e-3
    with pytest.raises(ValueError, match="different model: model"):
        run(lambda p, x: net(x), "g")
    # model_id still overrides everything
    run(lambda p, x: x @ W1, "id", model_id="v1")
    half_done("id")
    assert run(lambda p, x: x @ W2, "id", model_id="v1").complete


class _Flagged(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.use_residual = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), True

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h + h.sum(1, keepdim=True) if self.use_residual else h)


def test_resume_after_a_plain_attribute_changed_is_refused(tmp_path):
    # a flag the forward reads is not in repr(): a finished store was handed back with the other setting's
    # attributions (1.65 off), found by an outside tester
    ds = tiny_data()
    net = _Flagged().eval()
    run = lambda: ax.distributed.attribute_dataset(  # noqa: E731
        ax.saliency, *ax.functionalize(net), ds, out=tmp_path / "s", batch_size=4, shard_size=4, progress=False)
    run()
    net.use_residual = False
    with pytest.raises(ValueError, match=r'different model: model \{.*"structure"'):
        run()
    net.use_residual = True
    assert run().complete


SCALE = 3.0


def _scaled(x):
    return SCALE * x.tanh()


def test_model_structure_covers_code_defaults_closure_and_globals():
    structure = ax.distributed._model_structure

    def make(W, k=1):
        def f(p, x, k=k):
            return _scaled(x @ W) * k
        return f

    base = structure(make(torch.ones(4, 3)))
    assert structure(ax.functionalize(make(torch.ones(4, 3)))[0]) == base  # the wrapper is seen through; contents, not ids
    assert structure(make(torch.ones(4, 3), k=2)) != base  # a default
    assert structure(make(torch.ones(4, 3) * 2)) != base  # a closure cell
    assert structure(make(torch.ones(4, 3, dtype=torch.float64))) != base
    global SCALE
    try:
        SCALE = 4.0  # a global of a function that f calls
        assert structure(make(torch.ones(4, 3))) != base
    finally:
        SCALE = 3.0
    assert structure(make(torch.ones(4, 3))) == base


STRUCTURE_SOURCE = '''
import numpy as np, torch
TABLE = {"scale": 2.5, "tags": {"a", "b", "c"}, "w": np.arange(6.0)}
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LeakyReLU(0.2)).eval()
def helper(x):
    return x * TABLE["scale"] if x.dtype in {torch.float32, torch.float64} else x
def make():
    w = torch.full((2, 2), 0.5)
    return lambda p, x: helper(net(x @ w)) + float(TABLE["w"].sum())
fn = make()
'''


def test_model_structure_is_the_same_in_another_process(tmp_path):
    # the manifest is compared across runs and ranks: no ids, addresses or hash-seed orders in it
    import runpy

    src = tmp_path / "model_src.py"
    src.write_text(STRUCTURE_SOURCE)
    mine = runpy.run_path(str(src))
    code = ("import runpy, sys, attrax as ax; m = runpy.run_path(sys.argv[1]); "
            "print(ax.distributed._model_structure(m['fn'])); print(ax.distributed._model_structure(ax.functionalize(m['net'])[0]))")
    env = dict(ENV, PYTHONHASHSEED="123")
    theirs = subprocess.run([sys.executable, "-c", code, str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout.split() == [ax.distributed._model_structure(mine["fn"]),
                                     ax.distributed._model_structure(ax.functionalize(mine["net"])[0])]


def test_damaged_shard_files_and_manifest_are_named(tmp_path):
    # review of 15.4: a 0-byte .npy crashed numpy (EOFError), an edited index entry went unnoticed
    # and a bad value in it crashed open_store; a broken manifest.json gave a bare JSON error
    f, p, ds = small_job()
    calls = []

    def counted(*a, **k):
        calls.append(len(a[2]))
        return ax.saliency(*a, **k)

    counted.__qualname__, counted.__module__ = "saliency", "attrax.gradients"
    kw = dict(out=tmp_path, batch_size=10, shard_size=10, progress=False)
    first = ax.distributed.attribute_dataset(counted, f, p, ds, **kw)
    reference, targets = np.asarray(first.attributions).copy(), first.targets.copy()
    shard = lambda k, ext: tmp_path / f"shard-{k:05d}.{ext}"  # noqa: E731

    def edit(k, **fields):
        info = json.loads(shard(k, "json").read_text())
        shard(k, "json").write_text(json.dumps({**info, **fields}))

    # from the last shard back, so that open_store (which names the first bad shard) names each in turn
    info4 = json.loads(shard(4, "json").read_text())
    edit(4, targets=[(t + 1) % 5 for t in info4["targets"]])
    with pytest.raises(ValueError, match=r"shard-00004.json fails its checksum.*rerun attribute_dataset"):
        ax.distributed.open_store(tmp_path)
    edit(3, delta=["abc"] + [0.0] * 9)
    for verify in (True, False):
        with pytest.raises(ValueError, match=r"shard-00003.json holds a bad value: delta\[0\] = 'abc'"):
            ax.distributed.open_store(tmp_path, verify=verify)
    edit(2, targets=[1.5] * 10)
    with pytest.raises(ValueError, match=r"shard-00002.json holds a bad value: targets\[0\] = 1.5"):
        ax.distributed.open_store(tmp_path)
    shard(1, "npy").write_bytes(b"")
    for verify in (True, False):
        with pytest.raises(ValueError, match="shard-00001.npy is truncated or corrupt"):
            ax.distributed.open_store(tmp_path, verify=verify)
    calls.clear()
    with pytest.warns(RuntimeWarning) as caught:
        again = ax.distributed.attribute_dataset(counted, f, p, ds, **kw)
    named = sorted(str(w.message).split(": ")[1].split(" ")[0] for w in caught)
    assert named == ["shard-00001.npy", "shard-00002.json", "shard-00003.json", "shard-00004.json"]
    assert calls == [1, 10, 10, 10, 10]  # the probe, then exactly the four bad shards
    assert again.complete and np.array_equal(np.asarray(again.attributions), reference)
    assert np.array_equal(again.targets, targets)
    # a shard pair from another store of the same shape is not this store's
    other = ax.distributed.attribute_dataset(ax.saliency, f, p, ds, **dict(kw, out=tmp_path / "other"), abs=False)
    for ext in ("json", "npy"):
        shard(0, ext).write_bytes((other.path / f"shard-00000.{ext}").read_bytes())
    with pytest.raises(ValueError, match="shard-00000.json fails its checksum"):
        ax.distributed.open_store(tmp_path)
    # a truncated manifest names its file and what to do, from open_store and from a resume
    manifest = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(manifest[:len(manifest) // 2])
    expect = r"manifest.json'? is corrupt \(not JSON.*\).*use a new folder"
    with pytest.raises(ValueError, match=expect):
        ax.distributed.open_store(tmp_path)
    with pytest.raises(ValueError, match=expect):
        ax.distributed.attribute_dataset(counted, f, p, ds, **kw)
    (tmp_path / "manifest.json").write_text(json.dumps({**json.loads(manifest), "n": "sixty"}))
    with pytest.raises(ValueError, match=r"manifest.json'? is corrupt \(n = 'sixty'"):
        ax.distributed.open_store(tmp_path)


def test_bad_shards_are_named_by_open_store_and_recomputed_on_resume(tmp_path):
    # issue 15.4: a truncated, corrupted or swapped shard used to be read back (or crash numpy) unnoticed
    f, p, ds = small_job()
    calls = []

    def counted(*a, **k):
        calls.append(len(a[2]))
        return ax.saliency(*a, **k)

    counted.__qualname__, counted.__module__ = "saliency", "attrax.gradients"
    kw = dict(out=tmp_path, batch_size=10, shard_size=10, progress=False)
    reference = np.asarray(ax.distributed.attribute_dataset(counted, f, p, ds, **kw).attributions).copy()
    shard = lambda k, ext: tmp_path / f"shard-{k:05d}.{ext}"  # noqa: E731
    # corrupt from the last shard back, so open_store (which names the first bad shard) names each in turn
    shard(5, "json").write_text('{"shard": 5, "fi')
    with pytest.raises(ValueError, match=r"shard-00005.json is corrupt \(not JSON\).*rerun attribute_dataset"):
        ax.distributed.open_store(tmp_path)
    a3, a4 = shard(3, "npy").read_bytes(), shard(4, "npy").read_bytes()
    shard(3, "npy").write_bytes(a4)
    shard(4, "npy").write_bytes(a3)
    with pytest.raises(ValueError, match="shard-00003.npy fails its checksum"):
        ax.distributed.open_store(tmp_path)
    data = bytearray(shard(2, "npy").read_bytes())
    data[-3] ^= 0x40  # one bit of one attribution
    shard(2, "npy").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00002.npy fails its checksum"):
        ax.distributed.open_store(tmp_path)
    shard(1, "npy").write_bytes(shard(1, "npy").read_bytes()[:-40])
    for verify in (True, False):  # truncation is found without reading the data
        with pytest.raises(ValueError, match="shard-00001.npy is truncated or corrupt"):
            ax.distributed.open_store(tmp_path, verify=verify)
    calls.clear()
    with pytest.warns(RuntimeWarning) as caught:
        again = ax.distributed.attribute_dataset(counted, f, p, ds, **kw)
    named = sorted(str(w.message).split(": ")[1].split(" ")[0] for w in caught)
    assert named == ["shard-00001.npy", "shard-00002.npy", "shard-00003.npy", "shard-00004.npy", "shard-00005.json"]
    assert calls == [1, 10, 10, 10, 10, 10]  # the probe, then exactly the five bad shards
    assert again.complete and np.array_equal(np.asarray(again.attributions), reference)


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    # issue 15.4: a second job on the folder used to delete the first one's files in flight
    out = tmp_path / "store"
    job = run_job(out, "--delay", "0.5", wait=False)
    try:
        deadline = time.monotonic() + 120
        while not (out / "manifest.json").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, job.communicate()[0]
        net, ds = model_and_data()
        f, p = ax.functionalize(net)
        with pytest.raises(ValueError, match=rf"is being written by another attribute_dataset \(pid {job.pid} on "):
            ax.distributed.attribute_dataset(ax.integrated_gradients, f, p, ds, out=out, batch_size=10, shard_size=20,
                                             n_steps=16, progress=False)
    finally:
        job.kill()
        job.communicate(timeout=60)
    # the lock dies with its holder: the resume goes on
    done = ax.distributed.attribute_dataset(ax.integrated_gradients, f, p, ds, out=out, batch_size=10, shard_size=20,
                                            n_steps=16, progress=False)
    assert done.complete


def test_leftover_temporary_files_are_removed_only_when_their_writer_is_gone(tmp_path):
    # issue 15.4: cleanup used to delete every *.tmp-* file, a live writer's included
    f, p, ds = small_job()
    kw = dict(out=tmp_path, batch_size=30, progress=False)
    ax.distributed.attribute_dataset(ax.saliency, f, p, ds, **kw)
    host = ax.distributed._host()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = tmp_path / f"shard-00001.npy.tmp-{host}-{os.getppid()}"
    gone = tmp_path / f"shard-00001.npy.tmp-{host}-{dead.pid}"
    fresh_elsewhere = tmp_path / "shard-00000.json.tmp-otherhost-12"
    old_elsewhere = tmp_path / "shard-00000.npy.tmp-otherhost-13"
    for q in (live, gone, fresh_elsewhere, old_elsewhere):
        q.write_bytes(b"in flight")
    hours_ago = time.time() - 7200
    os.utime(old_elsewhere, (hours_ago, hours_ago))
    ax.distributed.attribute_dataset(ax.saliency, f, p, ds, **kw)
    assert live.exists() and fresh_elsewhere.exists()
    assert not gone.exists() and not old_elsewhere.exists()


class Pairs(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"shard_size": 2.5}, TypeError, "shard_size must be a positive int"),
        ({"generator": torch.Generator()}, ValueError, "seed=<int> instead of generator="),
        ({"seed": "a"}, TypeError, "seed must be an int"),
        ({"dataset": [1, 2]}, TypeError, r"dataset\[0\] must be a pair"),
        ({"dataset": Pairs([(torch.zeros(1, 8, 8), 0.5)])}, TypeError, r"dataset\[0\]\[1\] \(the target\) must be an int"),
        ({"dataset": Pairs([("img", 1)])}, TypeError, r"dataset\[0\]\[0\] must be a tensor"),
        ({"dataset": Pairs([])}, ValueError, "dataset is empty"),
        ({"dataset": 3}, TypeError, "dataset must be a map-style Dataset"),
        ({"attribute": "ig"}, TypeError, "attribute must be an attrax method"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, exc, match):
    f, p, ds = small_job()
    call = {"attribute": ax.saliency, "dataset": ds, **kwargs}
    attribute, dataset = call.pop("attribute"), call.pop("dataset")
    with pytest.raises(exc, match=match):
        ax.distributed.attribute_dataset(attribute, f, p, dataset, out=tmp_path / "s", progress=False, **call)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_open_store_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no attrax store"):
        ax.distributed.open_store(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an attrax-store"):
        ax.distributed.open_store(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "attrax-store/1"}))
    with pytest.raises(ValueError, match="attrax-store/1 store from another attrax version"):
        ax.distributed.open_store(tmp_path)
