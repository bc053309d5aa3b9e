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
