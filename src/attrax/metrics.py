"""Diagnostics for attributions: completeness and (later) faithfulness metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target, TensorOrTuple
from .core import as_tuple, baselines_for
from .targets import prepare_call, select

__all__ = ["completeness_delta"]


def completeness_delta(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    attributions: TensorOrTuple,
    baseline: Tensor | float | tuple[Any, ...] | None = None,
) -> Tensor:
    r"""Signed completeness gap per sample: :math:`\sum_i a_i - (f_t(x) - f_t(x'))`.

    Sums the attributions over all non-batch dims (and over all inputs of a
    tuple). Zero for methods that satisfy completeness / summation-to-delta
    (IG up to quadrature error, DeepLift, LRP-0 with zero biases).

    Args:
        attributions: Same structure and shapes as ``x``.
        baseline: The reference :math:`x'`; zeros when ``None``.
    Returns:
        Tensor of shape ``(B,)``.
    Raises:
        ValueError: If the attributions do not match ``x``.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(3, 1, bias=False).eval())
        >>> x = torch.randn(2, 3)
        >>> a = ax.input_x_gradient(model_fn, params, x, None)
        >>> bool(ax.metrics.completeness_delta(model_fn, params, x, None, a).abs().max() < 1e-6)
        True
    """
    xs, params, _, batch, t = prepare_call(model_fn, params, x, target, check_finite=False)
    attrs, _ = as_tuple(attributions, "attributions")
    if len(attrs) != len(xs) or any(a.shape != xi.shape for a, xi in zip(attrs, xs)):
        raise ValueError(
            f"attributions must match x: got shapes {[tuple(a.shape) for a in attrs]}, "
            f"expected {[tuple(xi.shape) for xi in xs]}"
        )
    bs = baselines_for(baseline, xs)
    with torch.no_grad():
        fx = select(model_fn(params, *xs), t)
        fb = select(model_fn(params, *bs), t)
    total = sum(a.reshape(batch, -1).sum(1) for a in attrs)
    return total - (fx - fb).to(total.dtype)
