"""Shared benchmark helpers: interleaved timing, peak tensor memory, machine record, JSON output.

Times are reported as ratios to one forward + input-gradient pass of the same model and batch,
measured in the same process, interleaved round by round with the methods so that drift in machine
load affects all alike. Peak memory is the allocator's peak of live tensor bytes during one call:
on CUDA from ``torch.cuda.max_memory_allocated``, on CPU from the profiler's allocation events.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import captum

        info["captum"] = captum.__version__
    except ImportError:
        pass
    try:
        import zennit  # noqa: F401
        from importlib.metadata import version

        info["zennit"] = version("zennit")
    except Exception:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved round by round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def paired_ratios(base: Callable[[], Any], fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int = 15,
                  warmup: int = 2) -> dict[str, float]:
    """Each function's median time over the base's, the two timed interleaved with nothing else.

    Timing a heavy peer in the same rounds changes the allocator state the others see: measured on
    the 2-core CPU, Captum's DeepLiftShap (400 MB peak) made the 11 ms base 30 % slower, which
    flattered every ratio measured beside it. So each function gets its own rounds with the base.
    """
    out = {}
    for name, fn in fns.items():
        times = timeit({"base": base, name: fn}, device, rounds=rounds, warmup=warmup)
        out[name] = times[name] / times["base"]
    return out


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of live tensors allocated during one call of ``fn`` (above what was live before)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def forward_backward(module: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One forward and one gradient w.r.t. the input: the unit all ratios refer to."""

    def run() -> torch.Tensor:
        xx = x.detach().requires_grad_()
        out = module(xx)
        (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xx)
        return g

    return run


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"{name}-{tag}.json"
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
    return path


def quiet_captum() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*did not already require gradients.*")
    warnings.filterwarnings("ignore", message=".*Setting forward, backward hooks.*")
