"""Conditional attribution: 64 conditions at once vs 64 independent LRP calls (and zennit-crp).

    python benchmarks/bench_conditional.py [--rounds N]

A narrow VGG-16-like net with BatchNorm, one 3x64x64 sample (the usual concept-relevance use),
64 conditions = the 64 channels of a middle convolution, composite epsilon_plus_flat. attrax shares
the forward pass and propagates all conditions in one vmapped backward; the baseline is 64 calls of
``ax.lrp``. zennit-crp (when installed) is timed on its own copy of the model.
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
from _common import peak_memory, timeit, write  # noqa: E402
from _models import randomize_bn, vgg16_like  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conditions", type=int, default=64)
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = randomize_bn(vgg16_like(width=0.25, batchnorm=True, classes=10)).to(device).eval()
    layer = "14"  # the third block's second convolution (64 channels at width 0.25)
    x = torch.randn(1, 3, 64, 64, device=device)
    f, p = ax.functionalize(model)
    target = int(f(p, x).argmax())
    k = args.conditions
    conditions = [{layer: [c]} for c in range(k)]
    comp = ax.composites.epsilon_plus_flat()

    def batched():
        return ax.conditional(f, p, x, target, conditions, composite=comp)

    def independent():
        return [ax.lrp(f, p, x, target, composite=comp) for _ in range(k)]

    batched()
    independent()
    fns = {"attrax_batched": batched, "attrax_64_lrp": independent}
    row: dict = {"conditions": k, "layer": layer}
    try:
        from _peers import zennit

        zennit()
        from crp.attribution import CondAttribution
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat

        zmodel = copy.deepcopy(model)
        attribution = CondAttribution(zmodel)
        zcomp = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
        zconds = [{"y": [target], layer: [c]} for c in range(k)]

        def crp():
            return attribution(x.detach().clone().requires_grad_(), zconds, zcomp).heatmap

        ours = batched()[:, 0].sum(1)  # zennit-crp's heatmap sums over input channels
        theirs = crp().detach()  # zennit-crp seeds the logit itself, as attrax does
        row["max_rel_diff_to_zennit_crp"] = float(((ours - theirs).abs().max() / ours.abs().max()))
        fns["zennit_crp"] = crp
    except Exception as e:  # peer missing or failing
        row["zennit_crp_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    times = timeit(fns, device, rounds=args.rounds, warmup=1)
    row["seconds"] = times
    row["batched_over_independent"] = times["attrax_batched"] / times["attrax_64_lrp"]
    if "zennit_crp" in times:
        row["batched_over_zennit_crp"] = times["attrax_batched"] / times["zennit_crp"]
    row["peak_mb_batched"] = peak_memory(batched, device) / 2**20
    print({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()})
    write("conditional", {"model": "vgg16_bn narrow (width 0.25), 1x3x64x64", "composite": "epsilon_plus_flat", "result": row})


if __name__ == "__main__":
    main()
