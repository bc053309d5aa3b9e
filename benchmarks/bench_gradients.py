"""Gradient family: attrax vs Captum in one process.

    python benchmarks/bench_gradients.py [--rounds N]

CPU: small CNN, batch 16x3x32x32. CUDA (when available): VGG-16-like and ResNet-50-like at
32x3x224x224. Reports each method's time as a ratio to one forward + input-gradient pass, the
attrax/Captum time ratio, and peak tensor memory. IG runs at equal memory: attrax ``chunk_size=c``
steps per chunk against Captum ``internal_batch_size=c*B`` rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import attrax as ax  # noqa: E402
from _common import forward_backward, paired_ratios, peak_memory, quiet_captum, timeit, write  # noqa: E402
from _models import randomize_bn, resnet50_like, small_cnn, vgg16_like  # noqa: E402


def methods(module, x, t, ig_steps=32, ig_chunk=8, nt=10):
    import captum.attr as ca

    model_fn, params = ax.functionalize(module)
    gen = torch.Generator(device=x.device).manual_seed(0)
    baselines = torch.zeros(8, *x.shape[1:], device=x.device)
    rg = lambda: x.detach().requires_grad_()  # noqa: E731
    B = x.shape[0]
    return {
        "saliency": (
            lambda: ax.saliency(model_fn, params, x, t),
            lambda: ca.Saliency(module).attribute(rg(), target=t),
        ),
        "input_x_gradient": (
            lambda: ax.input_x_gradient(model_fn, params, x, t),
            lambda: ca.InputXGradient(module).attribute(rg(), target=t),
        ),
        f"integrated_gradients_{ig_steps}": (
            lambda: ax.integrated_gradients(model_fn, params, x, t, n_steps=ig_steps, chunk_size=ig_chunk),
            lambda: ca.IntegratedGradients(module).attribute(rg(), target=t, n_steps=ig_steps, internal_batch_size=ig_chunk * B),
        ),
        f"smoothgrad_{nt}": (
            lambda: ax.noise_tunnel(ax.saliency, model_fn, params, x, t, n_samples=nt, stdev=0.1, generator=gen),
            lambda: ca.NoiseTunnel(ca.Saliency(module)).attribute(rg(), target=t, nt_samples=nt, stdevs=0.1, nt_type="smoothgrad"),
        ),
        f"gradient_shap_{nt}": (
            lambda: ax.gradient_shap(model_fn, params, x, t, baselines, n_samples=nt, generator=gen),
            lambda: ca.GradientShap(module).attribute(rg(), baselines=baselines, target=t, n_samples=nt),
        ),
    }


def run_model(name, module, x, rounds):
    device = x.device
    t = torch.randint(0, 10, (x.shape[0],), device=device)
    base = forward_backward(module, x, t)
    rows = {}
    for mname, (ours, theirs) in methods(module, x, t).items():
        ratios = paired_ratios(base, {"attrax": ours, "captum": theirs}, device, rounds=rounds)
        rows[mname] = {
            "attrax_x_fwd_bwd": ratios["attrax"],
            "captum_x_fwd_bwd": ratios["captum"],
            "attrax_over_captum": ratios["attrax"] / ratios["captum"],
            "peak_mb_attrax": peak_memory(ours, device) / 2**20,
            "peak_mb_captum": peak_memory(theirs, device) / 2**20,
            "peak_mb_fwd_bwd": peak_memory(base, device) / 2**20,
        }
        r = rows[mname]
        print(
            f"{name:14s} {mname:26s} attrax {r['attrax_x_fwd_bwd']:6.2f}x  captum {r['captum_x_fwd_bwd']:6.2f}x  "
            f"ratio {r['attrax_over_captum']:5.2f}  peak MB {r['peak_mb_attrax']:8.1f} vs {r['peak_mb_captum']:8.1f}"
        )
    return {"input_shape": list(x.shape), "fwd_bwd_seconds": timeit({"b": base}, device, rounds=rounds)["b"], "methods": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    quiet_captum()
    torch.manual_seed(0)
    results = {}
    cpu = torch.device("cpu")
    results["small_cnn"] = run_model("small_cnn", small_cnn().eval(), torch.randn(16, 3, 32, 32, device=cpu), args.rounds)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        x = torch.randn(32, 3, 224, 224, device=gpu)
        results["vgg16_like"] = run_model("vgg16_like", vgg16_like().to(gpu).eval(), x, args.rounds)
        results["resnet50_like"] = run_model("resnet50_like", randomize_bn(resnet50_like()).to(gpu).eval(), x, args.rounds)
    write("gradients", {"unit": "time ratio to one forward + input-gradient pass; peak MB of live tensors", "models": results})


if __name__ == "__main__":
    main()
