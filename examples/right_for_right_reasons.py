"""Right for the right reasons (Ross, Hughes, Doshi-Velez 2017) on decoy digits, with attrax.

    python examples/right_for_right_reasons.py [--epochs 25] [--lam 300] [--out rrr-out]

scikit-learn's 8x8 digits get a *decoy*: in the training images the 2x2 top-left corner holds a
grey level that encodes the label, a shortcut a CNN happily learns. At test time the decoy carries
a random label. A plain model leans on the corner; a model trained with

    loss = cross_entropy(out, y) + lam * || mask * attribution ||^2

(mask: the corner; attribution: the input gradient of the true class) is pushed off it. Both the
output and the attribution come from ONE forward pass via ``ax.value_and_attribution``, and the
parameter gradient of the whole loss is ``torch.func.grad`` of a pure function of the params.
Prints accuracies and the share of saliency mass inside the masked corner, writes ``rrr.png``
(rows: test digits; columns: input, plain saliency, RRR saliency) and ``rrr.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import attrax as ax
from attrax.demo import build_model, load_digits

CORNER = (slice(0, 2), slice(0, 2))


def with_decoy(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Paint the corner with grey level (label + 1) / 10 (digits' corners are blank, so it is visible)."""
    x = x.clone()
    x[:, 0, CORNER[0], CORNER[1]] = ((labels.float() + 1) / 10).reshape(-1, 1, 1)
    return x


def corner_mask(shape: torch.Size) -> torch.Tensor:
    mask = torch.zeros(shape)
    mask[:, 0, CORNER[0], CORNER[1]] = 1.0
    return mask


def train(x: torch.Tensor, y: torch.Tensor, lam: float, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    module = build_model()
    model_fn, params = ax.functionalize(module)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}  # the optimiser's leaves
    opt = torch.optim.Adam(params.values(), lr=3e-3)
    mask = corner_mask(x.shape)

    def loss_fn(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        out, attr = ax.value_and_attribution(ax.gradient, model_fn, p, xb, yb)  # one forward
        return nn.functional.cross_entropy(out, yb) + lam * (mb * attr).pow(2).sum() / len(yb)

    step = torch.func.grad(loss_fn)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            grads = step({k: v.detach() for k, v in params.items()}, x[idx], y[idx], mask[idx])
            for k, v in params.items():
                v.grad = grads[k]
            opt.step()
    with torch.no_grad():
        for k, v in params.items():
            dict(module.named_parameters())[k].copy_(v)
    return module.eval()


def evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model_fn, params = ax.functionalize(module)
    with torch.no_grad():
        accuracy = float((model_fn(params, x).argmax(1) == y).float().mean())
    sal = ax.saliency(model_fn, params, x, y)
    mass = float((sal * corner_mask(x.shape)).sum() / sal.sum())
    return {"accuracy": accuracy, "corner_saliency_share": mass}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--lam", type=float, default=300.0)
    ap.add_argument("--out", default="rrr-out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_tr, y_tr, x_te, y_te = load_digits()
    x_tr = with_decoy(x_tr, y_tr)
    wrong = (y_te + torch.randint(1, 10, y_te.shape, generator=torch.Generator().manual_seed(1))) % 10
    x_te = with_decoy(x_te, wrong)  # the decoy now lies

    results = {}
    models = {}
    for name, lam in (("plain", 0.0), ("rrr", args.lam)):
        models[name] = train(x_tr, y_tr, lam, args.epochs)
        results[name] = evaluate(models[name], x_te, y_te)
        r = results[name]
        print(f"{name:6s} lam={lam:<6g} test accuracy (decoy lies) {r['accuracy']:.3f}   "
              f"saliency mass in the masked corner {100 * r['corner_saliency_share']:.1f} %")
    (out / "rrr.json").write_text(json.dumps({"epochs": args.epochs, "lam": args.lam, **results}, indent=1))
    _figure(out / "rrr.png", models, x_te[:6], y_te[:6])
    print(f"wrote {out / 'rrr.png'} and {out / 'rrr.json'}")
    return results


def _figure(path: Path, models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor) -> None:
    try:
        from attrax import viz
    except ImportError:
        return
    rows = []
    for i in range(len(x)):
        cells = [viz.heatmap(x[i], sign="positive", cmap="gray")]
        for module in models.values():
            model_fn, params = ax.functionalize(module)
            cells.append(viz.heatmap(ax.saliency(model_fn, params, x[i:i + 1], y[i:i + 1])[0], sign="positive"))
        rows.append(cells)
    viz.save(path, viz.grid(rows, titles=["input", "plain", "RRR"], scale=12))


if __name__ == "__main__":
    main()
