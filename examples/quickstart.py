"""A short tour of attrax on a small CNN: run with `python examples/quickstart.py`."""

import torch
from torch import nn

import attrax as ax


def main() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    model_fn, params = ax.functionalize(net)
    x = torch.randn(4, 1, 8, 8)
    target = model_fn(params, x).argmax(1)  # explain the predicted class

    attrs = {
        "saliency": ax.saliency(model_fn, params, x, target),
        "input_x_gradient": ax.input_x_gradient(model_fn, params, x, target),
        "integrated_gradients": ax.integrated_gradients(model_fn, params, x, target, n_steps=64),
        "smoothgrad": ax.smoothgrad(model_fn, params, x, target, stdev=0.1, generator=torch.Generator().manual_seed(0)),
    }
    for name, a in attrs.items():
        delta = ax.metrics.completeness_delta(model_fn, params, x, target, a)
        print(f"{name:22s} shape {tuple(a.shape)}  max |completeness delta| {delta.abs().max().item():.2e}")

    # Everything composes: vmap over baselines, grad w.r.t. params through the attribution.
    baselines = torch.randn(3, *x.shape) * 0.1
    per_baseline = torch.func.vmap(lambda b: ax.integrated_gradients(model_fn, params, x, target, baseline=b, n_steps=16))(baselines)
    print("IG for 3 baselines at once:", tuple(per_baseline.shape))
    weights = dict(net.named_parameters())
    grads = torch.func.grad(lambda w: (ax.saliency(model_fn, {**params, **w}, x, target, abs=False) ** 2).sum())(weights)
    print("d/dparams of an attribution loss:", {k: tuple(v.shape) for k, v in list(grads.items())[:2]}, "...")


if __name__ == "__main__":
    main()
