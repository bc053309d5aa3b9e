"""LRP: attrax vs Zennit (and Captum LRP) in one process.

    python benchmarks/bench_lrp.py [--rounds N]

CPU: narrow VGG-16-like (BatchNorm) and ResNet-50-like nets at 8x3x64x64. CUDA (when available):
VGG-16-like and ResNet-50-like at 32x3x224x224. Composite: epsilon_plus_flat with BatchNorm merged
(Zennit: EpsilonPlusFlat with SequentialMergeBatchNorm / its ResNet canonizer). Zennit is timed with
its hooks already registered (the composite context is entered once, outside the timing); attrax
after its first call (the traced program is memoised on model_fn). Reports time as a ratio to one
forward + input-gradient pass, peak tensor memory, and the max relative difference to Zennit x score.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import attrax as ax  # noqa: E402
from _common import forward_backward, paired_ratios, peak_memory, quiet_captum, write  # noqa: E402
from _models import randomize_bn, resnet50_like, vgg16_like  # noqa: E402


def torchvision_bottleneck():
    """Bottlenecks of torchvision's class (or the tests' stand-in for it), so Zennit's ResNet canonizer applies."""
    from torch import nn

    try:
        from _peers import resnet_blocks

        _, bottleneck = resnet_blocks()
    except Exception:
        return None

    def make(c_in, width, stride):
        down = None
        if stride != 1 or c_in != width * 4:
            down = nn.Sequential(nn.Conv2d(c_in, width * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(width * 4))
        return bottleneck(c_in, width, stride=stride, downsample=down)

    return make


def zennit_setup(module, arch):
    try:
        from _peers import zennit

        zennit()
        from zennit.attribution import Gradient
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat
    except Exception as e:  # pragma: no cover - peer missing
        return None, f"zennit unavailable: {e}"
    if arch == "resnet":
        from zennit.torchvision import ResNetCanonizer

        canon = ResNetCanonizer()
    else:
        canon = SequentialMergeBatchNorm()
    composite = EpsilonPlusFlat(canonizers=[canon])
    attributor = Gradient(model=module, composite=composite)
    attributor.__enter__()
    return attributor, None


def run_model(name, arch, module, x, rounds):
    device = x.device
    model_fn, params = ax.functionalize(module)
    t = torch.randint(0, 10, (x.shape[0],), device=device)
    comp = ax.composites.epsilon_plus_flat()
    ours = lambda: ax.lrp(model_fn, params, x, t, composite=comp)  # noqa: E731
    reference = ours()
    base = forward_backward(module, x, t)
    row: dict = {}
    fns = {"attrax": ours}
    # Zennit mutates the module it explains while its attributor is active (canonizer forwards,
    # merged parameters, extra submodules), so it gets its own copy.
    zmodule = copy.deepcopy(module)
    attributor, err = zennit_setup(zmodule, arch)
    if attributor is not None:
        with torch.no_grad():
            n_out = module(x).shape[1]
        onehot = torch.nn.functional.one_hot(t, n_out).to(x.dtype)

        def theirs():
            return attributor(x.detach().requires_grad_(), onehot)[1]

        try:
            rel = theirs()
            with torch.no_grad():
                score = module(x).gather(1, t[:, None])[:, 0]
            diff = (reference - rel * score[:, None, None, None]).abs().max() / reference.abs().max()
            row["max_rel_diff_to_zennit"] = float(diff)
            fns["zennit"] = theirs
        except Exception as e:
            row["zennit_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    else:
        row["zennit_error"] = err
    try:
        import captum.attr as ca

        captum_lrp = ca.LRP(module)
        captum_lrp.attribute(x.detach().requires_grad_(), target=t)
        fns["captum"] = lambda: captum_lrp.attribute(x.detach().requires_grad_(), target=t)
    except Exception as e:
        row["captum_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    ratios = paired_ratios(base, fns, device, rounds=rounds)
    row["attrax_x_fwd_bwd"] = ratios["attrax"]
    row["peak_mb_attrax"] = peak_memory(ours, device) / 2**20
    row["peak_mb_fwd_bwd"] = peak_memory(base, device) / 2**20
    for peer in ("zennit", "captum"):
        if peer in ratios:
            row[f"{peer}_x_fwd_bwd"] = ratios[peer]
            row[f"attrax_over_{peer}"] = ratios["attrax"] / ratios[peer]
            row[f"peak_mb_{peer}"] = peak_memory(fns[peer], device) / 2**20
    if attributor is not None:
        attributor.__exit__(None, None, None)
    print(f"{name:16s} " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return {"input_shape": list(x.shape), "composite": "epsilon_plus_flat", "lrp": row}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    quiet_captum()
    import warnings

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    x = torch.randn(8, 3, 64, 64, device=cpu)
    results = {
        "vgg16_bn_narrow": run_model("vgg16_bn_narrow", "vgg", randomize_bn(vgg16_like(width=0.25, batchnorm=True)).eval(), x, args.rounds),
        "resnet50_narrow": run_model(
            "resnet50_narrow", "resnet", randomize_bn(resnet50_like(width=0.25, block=torchvision_bottleneck())).eval(), x, args.rounds
        ),
    }
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        xg = torch.randn(32, 3, 224, 224, device=gpu)
        results["vgg16_like"] = run_model("vgg16_like", "vgg", vgg16_like().to(gpu).eval(), xg, args.rounds)
        results["resnet50_like"] = run_model(
            "resnet50_like", "resnet", randomize_bn(resnet50_like(block=torchvision_bottleneck())).to(gpu).eval(), xg, args.rounds
        )
    write("lrp", {"unit": "time ratio to one forward + input-gradient pass; peak MB of live tensors", "models": results})


if __name__ == "__main__":
    main()
