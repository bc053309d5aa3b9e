"""Perturbation methods: attrax vs Captum in one process, same number of model evaluations.

    python benchmarks/bench_perturbation.py [--rounds N]

Two models on CPU, batch 16: a tabular MLP (32 features), where the cost of a model call is small
and call overhead dominates (the usual setting for KernelSHAP and occlusion of features), and a
small CNN on 3x32x32 images, where the convolutions dominate. Occlusion of every feature / of 4x4
windows over all channels, and KernelSHAP with 200 coalitions (of the 32 features / of 64 4x4
superpixels). Captum runs with its default ``perturbations_per_eval=1`` (one model call per
perturbation); attrax with ``chunk_size=None`` (all perturbations in one call) and smaller chunks.
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
from _models import small_cnn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    quiet_captum()
    import captum.attr as ca

    torch.manual_seed(0)
    device = torch.device("cpu")
    results = {"tabular_mlp": tabular(ca, args.rounds, device), "small_cnn": images(ca, args.rounds, device)}
    write("perturbation", {"unit": "ratio to one forward+input-gradient (each timed with it alone), peak MB; speedup = Captum ratio / attrax ratio",
                           "models": results})


def report(name, fns, base, rounds, device, pairs):
    ratios = paired_ratios(base, fns, device, rounds=rounds, warmup=1)  # each timed with the base alone
    rows = {k: {"x_fwd_bwd": v, "peak_mb": peak_memory(fns[k], device) / 2**20} for k, v in ratios.items()}
    for k, v in rows.items():
        print(f"{name:12s} {k:30s} {v['x_fwd_bwd']:8.1f}x fwd+bwd  peak {v['peak_mb']:7.1f} MB")
    summary = {f"{ours}_speedup_vs_{theirs}": ratios[theirs] / ratios[ours] for ours, theirs in pairs}
    print(name, {k: round(v, 2) for k, v in summary.items()})
    return {"methods": rows, "speedups": summary}


def tabular(ca, rounds, device):
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 4)).eval()
    f, p = ax.functionalize(m)
    x = torch.randn(16, 32)
    t = torch.randint(0, 4, (16,))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fns = {
        "occlusion_attrax": lambda: ax.occlusion(f, p, x, t, window=1),
        "occlusion_captum": lambda: ca.Occlusion(m).attribute(x, sliding_window_shapes=(1,), target=t),
        "kernel_shap_attrax": lambda: ax.kernel_shap(f, p, x, t, n_samples=200, generator=gen()),
        "kernel_shap_captum": lambda: ca.KernelShap(m).attribute(x, n_samples=200, target=t),
    }
    diff = float((fns["occlusion_attrax"]() - fns["occlusion_captum"]()).abs().max())
    out = report("tabular_mlp", fns, forward_backward(m, x, t), rounds, device,
                 [("occlusion_attrax", "occlusion_captum"), ("kernel_shap_attrax", "kernel_shap_captum")])
    out["occlusion_max_abs_diff_to_captum"] = diff
    return out


def images(ca, rounds, device):
    m = small_cnn().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(16, 3, 32, 32)
    t = torch.randint(0, 10, (16,))
    mask = (torch.arange(32).reshape(1, -1) // 4 * 8 + torch.arange(32).reshape(-1, 1) // 4).T.reshape(1, 1, 32, 32)
    mask = mask.expand(1, 3, 32, 32)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    occ = dict(window=(3, 4, 4), stride=(3, 4, 4))
    fns = {
        "occlusion_attrax": lambda: ax.occlusion(f, p, x, t, **occ),
        "occlusion_attrax_chunk1": lambda: ax.occlusion(f, p, x, t, **occ, chunk_size=1),
        "occlusion_captum": lambda: ca.Occlusion(m).attribute(x, sliding_window_shapes=(3, 4, 4), strides=(3, 4, 4), target=t),
        "kernel_shap_attrax": lambda: ax.kernel_shap(f, p, x, t, feature_mask=mask, n_samples=200, generator=gen()),
        "kernel_shap_attrax_chunk1": lambda: ax.kernel_shap(f, p, x, t, feature_mask=mask, n_samples=200, generator=gen(),
                                                            chunk_size=1),
        "kernel_shap_captum": lambda: ca.KernelShap(m).attribute(x, feature_mask=mask, n_samples=200, target=t),
    }
    diff = float((fns["occlusion_attrax"]() - fns["occlusion_captum"]()).abs().max())
    out = report("small_cnn", fns, forward_backward(m, x, t), rounds, device,
                 [("occlusion_attrax", "occlusion_captum"), ("occlusion_attrax_chunk1", "occlusion_captum"),
                  ("kernel_shap_attrax", "kernel_shap_captum"), ("kernel_shap_attrax_chunk1", "kernel_shap_captum")])
    out["occlusion_max_abs_diff_to_captum"] = diff
    return out


if __name__ == "__main__":
    main()
