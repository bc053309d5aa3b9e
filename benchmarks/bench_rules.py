"""Rule methods (DeepLift, DeepLiftShap, guided backprop, deconvnet): attrax vs Captum in one process.

    python benchmarks/bench_rules.py [--rounds N]

CPU: small CNN (16x3x32x32), a narrow VGG-16-like net (8x3x64x64, ReLU -> max-pool blocks) and a
narrow ResNet-50-like net with reused in-place ReLUs (8x3x64x64).
CUDA (when available): VGG-16-like and ResNet-50-like at 32x3x224x224. Reports time as a ratio to
one forward + input-gradient pass, peak tensor memory, and the completeness error of each
DeepLift result (max over the batch of |sum(attr) - (f(x) - f(x'))| / max(1, |f(x) - f(x')|)).
attrax and Captum are each timed interleaved with the base alone (``paired_ratios``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import attrax as ax  # noqa: E402
from _common import forward_backward, paired_ratios, peak_memory, quiet_captum, write  # noqa: E402
from _models import randomize_bn, resnet50_like, small_cnn, vgg16_like  # noqa: E402


def completeness(model_fn, params, x, t, attr, baseline):
    with torch.no_grad():
        out_x = model_fn(params, x).gather(1, t[:, None])[:, 0]
        out_b = model_fn(params, baseline).gather(1, t[:, None])[:, 0]
        span = out_x - out_b
        delta = attr.flatten(1).sum(1) - span
    return float((delta.abs() / span.abs().clamp(min=1)).max())


def run_model(name, module, x, rounds, n_baselines=8, chunk=4):
    import captum.attr as ca

    device = x.device
    model_fn, params = ax.functionalize(module)
    t = torch.randint(0, 10, (x.shape[0],), device=device)
    b = torch.zeros_like(x)
    bl = torch.randn(n_baselines, *x.shape[1:], device=device) * 0.1
    rg = lambda: x.detach().requires_grad_()  # noqa: E731
    pairs = {
        "deeplift": (
            lambda: ax.deeplift(model_fn, params, x, t, baseline=b),
            lambda: ca.DeepLift(module).attribute(rg(), baselines=b, target=t),
        ),
        f"deeplift_shap_{n_baselines}": (
            lambda: ax.deeplift_shap(model_fn, params, x, t, bl, chunk_size=chunk),
            lambda: ca.DeepLiftShap(module).attribute(rg(), baselines=bl, target=t),
        ),
        "guided_backprop": (
            lambda: ax.guided_backprop(model_fn, params, x, t),
            lambda: ca.GuidedBackprop(module).attribute(rg(), target=t),
        ),
        "deconvnet": (
            lambda: ax.deconvnet(model_fn, params, x, t),
            lambda: ca.Deconvolution(module).attribute(rg(), target=t),
        ),
    }
    base = forward_backward(module, x, t)
    rows = {}
    for mname, (ours, theirs) in pairs.items():
        ours()  # trace once (memoised on model_fn), as a served model would
        row = {}
        try:
            theirs_out = theirs()
            fns = {"attrax": ours, "captum": theirs}
        except Exception as e:  # the peer fails on this model
            theirs_out = None
            row["captum_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            fns = {"attrax": ours}
        ratios = paired_ratios(base, fns, device, rounds=rounds)
        row["attrax_x_fwd_bwd"] = ratios["attrax"]
        row["peak_mb_attrax"] = peak_memory(ours, device) / 2**20
        row["peak_mb_fwd_bwd"] = peak_memory(base, device) / 2**20
        if theirs_out is not None:
            row["captum_x_fwd_bwd"] = ratios["captum"]
            row["attrax_over_captum"] = ratios["attrax"] / ratios["captum"]
            row["peak_mb_captum"] = peak_memory(theirs, device) / 2**20
        if mname == "deeplift":
            row["completeness_attrax"] = completeness(model_fn, params, x, t, ours(), b)
            if theirs_out is not None:
                row["completeness_captum"] = completeness(model_fn, params, x, t, theirs_out.detach(), b)
        if mname.startswith("deeplift_shap"):
            row["chunk_size"] = chunk
            # chunk_size bounds memory: at most chunk_size * B input-reference pairs are alive
            sweep = {c: lambda c=c: ax.deeplift_shap(model_fn, params, x, t, bl, chunk_size=c) for c in (1, 2, 4, 8)}
            sweep_ratios = paired_ratios(base, sweep, device, rounds=max(3, rounds // 3))
            row["chunk_sweep"] = {
                str(c): {"x_fwd_bwd": sweep_ratios[c], "peak_mb": peak_memory(fn, device) / 2**20} for c, fn in sweep.items()
            }
        rows[mname] = row
        print(f"{name:14s} {mname:18s} " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return {"input_shape": list(x.shape), "methods": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    quiet_captum()
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    results = {
        "small_cnn": run_model("small_cnn", small_cnn().eval(), torch.randn(16, 3, 32, 32, device=cpu), args.rounds),
        "vgg16_narrow": run_model(
            "vgg16_narrow", vgg16_like(classes=10, width=0.25).eval(), torch.randn(8, 3, 64, 64, device=cpu), args.rounds
        ),
        "resnet50_narrow": run_model(
            "resnet50_narrow", randomize_bn(resnet50_like(width=0.25)).eval(), torch.randn(8, 3, 64, 64, device=cpu), args.rounds
        ),
    }
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        x = torch.randn(32, 3, 224, 224, device=gpu)
        results["vgg16_like"] = run_model("vgg16_like", vgg16_like().to(gpu).eval(), x, args.rounds)
        results["resnet50_like"] = run_model("resnet50_like", randomize_bn(resnet50_like()).to(gpu).eval(), x, args.rounds)
    write("rules", {"unit": "time ratio to one forward + input-gradient pass; peak MB of live tensors", "models": results})


if __name__ == "__main__":
    main()
