"""Dataset scale: attribute_dataset throughput over processes, and the adaptive-IG cost dial.

    python benchmarks/bench_dataset.py [--samples 1536] [--repeats 3] [--nets 20]

1. Throughput. A CPU-bound small CNN (3x32x32 inputs), IG with 16 steps, batch 32, a synthetic
   dataset. Samples/s of the whole ``attribute_dataset`` call on rank 0 (process-group set-up,
   writing the store and the final barrier included; interpreter start-up excluded) for one
   process with torch's default threads, one process with one thread, and ``torchrun
   --nproc-per-node 2`` (one thread per rank, torchrun's default). Each configuration runs
   ``--repeats`` times on a fresh folder; the median is reported. The machine's cores are all
   that it gets: run on a 2-core machine (or under ``taskset -c 0,1``) for the 2-core figure.
2. Adaptive IG, both strategies (``panels``, the default, and ``doubling``), rtol 0.01, max_steps
   512, on two families of random ReLU CNNs with biases: ``--nets`` nets of 2 conv + 2 linear
   layers (default init, 3x16x16, 32 samples each, zero baseline) and 2x``--nets`` of the test
   suite's ``attrax.testing.relu_cnns`` architectures (32 inputs each, random baselines). Against fixed Gauss-Legendre n: the
   smallest n on a fine grid at which every sample the strategy brought under rtol is under rtol
   too. The cost of ``auto`` counts every evaluation it made (discarded rules included), and is
   also given with each extra forward counted as a full evaluation, and as wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import attrax as ax  # noqa: E402
from _common import write  # noqa: E402
from _models import small_cnn  # noqa: E402

BATCH, STEPS, SHARD = 32, 16, 128


def dataset(n: int) -> torch.utils.data.Dataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def worker(out: str, n: int) -> None:
    torch.manual_seed(0)
    f, p = ax.functionalize(small_cnn().eval())
    ds = dataset(n)
    start = time.perf_counter()
    ax.distributed.attribute_dataset(ax.integrated_gradients, f, p, ds, out=out, batch_size=BATCH, shard_size=SHARD,
                                     n_steps=STEPS, progress=False)
    elapsed = time.perf_counter() - start
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps({"seconds": elapsed, "samples": n, "threads": torch.get_num_threads()}))


def launch(procs: int, threads: int | None, n: int) -> dict:
    out = tempfile.mkdtemp(prefix="attrax-bench-")
    shutil.rmtree(out)
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--worker", out, "--samples", str(n)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *cmd[1:]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def throughput(n: int, repeats: int) -> dict:
    configs = {"1 process, default threads": (1, None), "1 process, 1 thread": (1, 1), "2 processes (torchrun), 1 thread each": (2, 1)}
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    for _ in range(repeats):  # interleaved, so load drift hits every configuration alike
        for name, (procs, threads) in configs.items():
            runs[name].append(launch(procs, threads, n))
    rows = {}
    for name, rs in runs.items():
        rate = statistics.median(r["samples"] / r["seconds"] for r in rs)
        rows[name] = {"samples_per_s": rate, "threads_per_process": rs[0]["threads"], "runs": [r["seconds"] for r in rs]}
        print(f"{name:40s} {rate:8.1f} samples/s  (threads/process {rs[0]['threads']})")
    two = rows["2 processes (torchrun), 1 thread each"]["samples_per_s"]
    speedups = {
        "2proc_vs_1proc_default_threads": two / rows["1 process, default threads"]["samples_per_s"],
        "2proc_vs_1proc_1thread": two / rows["1 process, 1 thread"]["samples_per_s"],
    }
    print({k: round(v, 2) for k, v in speedups.items()})
    return {"model": "small_cnn 3x32x32", "method": f"integrated_gradients n_steps={STEPS}", "batch_size": BATCH,
            "shard_size": SHARD, "samples": n, "configs": rows, "speedups": speedups}


def random_relu_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    c1, c2 = 4 + seed % 5, 6 + seed % 7
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, c1, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(4 * c2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5),
    ).double().eval()


def families(nets: int) -> dict[str, list[tuple]]:
    """Two families of random ReLU CNNs: (model_fn, params, x, target, baseline) groups."""
    deep = []
    for seed in range(nets):
        f, p = ax.functionalize(random_relu_cnn(seed))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 3, 16, 16, dtype=torch.float64, generator=g)
        deep.append((f, p, x, torch.randint(0, 5, (32,), generator=g), torch.zeros_like(x)))
    from hypothesis import HealthCheck, given, settings

    from attrax.testing import relu_cnns

    small: list[tuple] = []

    @settings(max_examples=2 * nets, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(relu_cnns())
    def collect(case):
        # the test suite's architectures, with a dataset-sized batch: 32 inputs and random baselines
        g = torch.Generator().manual_seed(case.seed % 2**31)
        shape = (32, *case.x.shape[1:])
        x = torch.randn(shape, dtype=case.x.dtype, generator=g)
        n_out = case.model_fn(case.params, x[:1]).shape[1]
        small.append((case.model_fn, case.params, x, torch.randint(0, n_out, (32,), generator=g),
                      0.5 * torch.randn(shape, dtype=case.x.dtype, generator=g)))

    collect()
    return {
        f"{nets} ReLU CNNs (2 conv + 2 linear, max/avg pool, 3x16x16, 32 samples each, zero baseline)": deep,
        f"{2 * nets} attrax.testing.relu_cnns (1-2 conv blocks, 32 samples each, random baselines)": small,
    }


GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def fixed_needed(f, p, x, t, b, rtol, rows) -> int:
    """Smallest fixed Gauss-Legendre n on GRID meeting rtol on every sample in ``rows`` (the last if none)."""
    with torch.no_grad():
        span = (f(p, x) - f(p, b)).gather(1, torch.as_tensor(t).reshape(-1, 1).expand(len(x), 1)).squeeze(1).abs()
    for n in GRID:
        a = ax.integrated_gradients(f, p, x, t, baseline=b, n_steps=n)
        gap = ax.metrics.completeness_delta(f, p, x, t, a, baseline=b).abs()
        ok = gap <= torch.maximum(rtol * span, torch.finfo(span.dtype).eps ** 0.5 * (1 + span))
        if bool(ok[rows].all()):
            return n
    return GRID[-1]


def adaptive(nets: int, rtol: float = 0.01, max_steps: int = 512) -> dict:
    out = {}
    for name, groups in families(nets).items():
        rows = {s: {"converged": 0, "samples": 0, "evaluations": 0, "forwards": 0, "ratio": [], "ratio_with_fwd": [],
                    "time_ratio": []} for s in ("panels", "doubling")}
        for f, p, x, t, b in groups:
            t = t if isinstance(t, torch.Tensor) else torch.full((len(x),), int(t))
            res = {}
            for strategy in ("panels", "doubling"):
                start = time.perf_counter()
                res[strategy] = ax.gradients.adaptive_integrated_gradients(f, p, x, t, baseline=b, rtol=rtol, max_steps=max_steps,
                                                                           strategy=strategy)
                res[strategy + "_s"] = time.perf_counter() - start
            for strategy in ("panels", "doubling"):
                r = res[strategy]
                n = fixed_needed(f, p, x, t, b, rtol, r.converged)
                start = time.perf_counter()
                ax.integrated_gradients(f, p, x, t, baseline=b, n_steps=n)
                fixed_s = time.perf_counter() - start
                row = rows[strategy]
                row["converged"] += int(r.converged.sum())
                row["samples"] += len(x)
                row["evaluations"] += int(r.evaluations.sum())
                row["forwards"] += int(r.forwards.sum())
                row["ratio"].append(float(r.evaluations.double().mean()) / n)
                row["ratio_with_fwd"].append(float((r.evaluations + r.forwards).double().mean()) / n)
                row["time_ratio"].append(res[strategy + "_s"] / fixed_s)
        table = {}
        for strategy, row in rows.items():
            table[strategy] = {
                "converged_fraction": row["converged"] / row["samples"],
                "mean_evaluations": row["evaluations"] / row["samples"],
                "mean_forwards": row["forwards"] / row["samples"],
                "evaluations_over_fixed": statistics.mean(row["ratio"]),
                "evaluations_and_forwards_over_fixed": statistics.mean(row["ratio_with_fwd"]),
                "time_over_fixed": statistics.median(row["time_ratio"]),
                "samples": row["samples"],
            }
            print(f"{name[:40]:40s} {strategy:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in table[strategy].items()))
        out[name] = table
    return {"rtol": rtol, "max_steps": max_steps, "fixed_grid": list(GRID),
            "fixed": "per model group: the smallest n on the grid at which fixed Gauss-Legendre meets rtol on every "
                     "sample the strategy brought under rtol; ratios are per group, averaged over groups",
            "families": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--samples", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nets", type=int, default=20)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.samples)
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))
    payload = {"adaptive_ig": adaptive(args.nets)}
    if not args.skip_throughput:
        payload["throughput"] = throughput(args.samples, args.repeats)
    write("dataset", payload)


if __name__ == "__main__":
    main()
