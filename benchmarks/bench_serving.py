"""Serving: per-call latency of ax.compile'd explainers vs eager attrax vs Captum.

    python benchmarks/bench_serving.py [--calls 100] [--batch 8]

A stream of ``--calls`` small batches (small CNN, 3x32x32, a new random batch and new random
targets every call) explained with IG (32 steps) and DeepLift. Each variant is warmed up on 3
calls (compilation happens there) and then timed call by call, interleaved with the others; the
table gives the median and 90th percentile latency, the ratio to eager attrax and to one
forward+input-gradient pass, the first-call (compile) time, and the number of compiles after
warm-up, counted by a backend wrapper (must be 0). CUDA when available (then also the VGG-like
model at 224x224, batch 4), else CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import attrax as ax  # noqa: E402
from _common import forward_backward, quiet_captum, sync, write  # noqa: E402
from _models import small_cnn, vgg16_like  # noqa: E402


def stream(model: torch.nn.Module, shape: tuple[int, ...], calls: int, device: torch.device, classes: int) -> list[tuple]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return [(torch.randn(shape, generator=g).to(device), torch.randint(0, classes, (shape[0],), generator=g).to(device))
            for _ in range(calls)]


def variants(module, device):
    import captum.attr as ca
    from torch._dynamo.testing import CompileCounterWithBackend

    model_fn, params = ax.functionalize(module)
    rg = lambda x: x.detach().requires_grad_()  # noqa: E731
    counters = {"integrated_gradients": CompileCounterWithBackend("inductor"), "deeplift": CompileCounterWithBackend("inductor")}
    ig_c = ax.compile(ax.integrated_gradients, model_fn, params, backend=counters["integrated_gradients"], n_steps=32)
    dl_c = ax.compile(ax.deeplift, model_fn, params, backend=counters["deeplift"])
    return {
        "integrated_gradients": {
            "attrax compiled": lambda x, t: ig_c(x, t),
            "attrax eager": lambda x, t: ax.integrated_gradients(model_fn, params, x, t, n_steps=32),
            "captum": lambda x, t: ca.IntegratedGradients(module).attribute(rg(x), target=t, n_steps=32),
        },
        "deeplift": {
            "attrax compiled": lambda x, t: dl_c(x, t),
            "attrax eager": lambda x, t: ax.deeplift(model_fn, params, x, t),
            "captum": lambda x, t: ca.DeepLift(module).attribute(rg(x), target=t),
        },
    }, counters


def run(name: str, module: torch.nn.Module, shape: tuple[int, ...], calls: int, device: torch.device, classes: int) -> dict:
    module = module.to(device).eval()
    torch._dynamo.reset()
    data = stream(module, shape, calls + 3, device, classes)
    fns, counters = variants(module, device)
    base = {"fwd_bwd": [forward_backward(module, x, t) for x, t in data[:1]][0]}
    out = {}
    for method, impls in fns.items():
        first = {}
        for label, fn in impls.items():  # warm-up: compilation happens here
            sync(device)
            start = time.perf_counter()
            fn(*data[0])
            sync(device)
            first[label] = time.perf_counter() - start
            for x, t in data[1:3]:
                fn(x, t)
        compiles_warm = counters[method].frame_count
        times: dict[str, list[float]] = {k: [] for k in [*impls, "fwd_bwd"]}
        for x, t in data[3:]:
            for label, fn in [*impls.items(), ("fwd_bwd", lambda x, t: forward_backward(module, x, t)())]:
                sync(device)
                start = time.perf_counter()
                fn(x, t)
                sync(device)
                times[label].append(time.perf_counter() - start)
        # correctness of the compiled results on the stream
        err = max(float((impls["attrax compiled"](x, t) - impls["attrax eager"](x, t)).abs().max()) for x, t in data[3:8])
        base_t = statistics.median(times["fwd_bwd"])
        eager = statistics.median(times["attrax eager"])
        rows = {}
        for label in impls:
            med = statistics.median(times[label])
            rows[label] = {
                "median_ms": 1e3 * med,
                "p90_ms": 1e3 * statistics.quantiles(times[label], n=10)[-1],
                "over_eager": med / eager,
                "x_fwd_bwd": med / base_t,
                "first_call_s": first[label],
            }
            r = rows[label]
            print(f"{name:10s} {method:22s} {label:16s} median {r['median_ms']:8.2f} ms  p90 {r['p90_ms']:8.2f} ms  "
                  f"{r['over_eager']:5.2f}x eager  {r['x_fwd_bwd']:6.2f}x fwd+bwd  first call {r['first_call_s']:6.2f} s")
        recompiles = counters[method].frame_count - compiles_warm
        print(f"{name:10s} {method:22s} compiles during warm-up {compiles_warm}, after warm-up {recompiles}, "
              f"max |compiled - eager| {err:.2e}")
        out[method] = {"variants": rows, "compiles_warmup": compiles_warm, "recompiles_after_warmup": recompiles,
                       "max_abs_diff_compiled_vs_eager": err}
    return {"input_shape": list(shape), "calls": calls, "methods": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    quiet_captum()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    results = {"small_cnn": run("small_cnn", small_cnn(), (args.batch, 3, 32, 32), args.calls, device, 10)}
    if device.type == "cuda":
        results["vgg16_like"] = run("vgg16_like", vgg16_like(), (4, 3, 224, 224), args.calls, device, 1000)
    write("serving", {"unit": "per-call latency over a stream of batches with new targets each call", "models": results})


if __name__ == "__main__":
    main()
