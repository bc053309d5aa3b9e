"""Diagnostics for attributions: completeness and (later) faithfulness metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target, TensorOrTuple
from .core import baselines_for, forward_args, training_warned
from .gradients import call_baseline
from .targets import prepare_call, select

__all__ = ["Curve", "completeness_delta", "deletion_curve", "infidelity", "insertion_curve", "sensitivity_max"]


@forward_args
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
        baseline: The reference :math:`x'`; zeros when ``None``; a callable ``baseline(x)`` as for
            ``ax.integrated_gradients``.
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
    # evaluates the model at x first: that checks the target before anything else is computed
    xs, params, _, batch, t = prepare_call(model_fn, params, x, target, check_finite=False, check_output=False)
    attrs = _matching(attributions, xs)
    bs = baselines_for(call_baseline(baseline, xs, isinstance(x, (tuple, list))), xs, check_finite=False)
    with torch.no_grad():
        fx = select(model_fn(params, *xs), t)
        fb = select(model_fn(params, *bs), t)
    total = sum(a.reshape(batch, -1).sum(1) for a in attrs)
    return total - (fx - fb).to(total.dtype)


# ------------------------------------------------------------------------ faithfulness


@forward_args
def infidelity(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    attributions: TensorOrTuple,
    *,
    n_samples: int = 10,
    stdev: float = 0.1,
    generator: torch.Generator | None = None,
    perturbations: TensorOrTuple | None = None,
    normalize: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Infidelity [1]: :math:`\mathbb E_I[(I^\top a - (f_t(x) - f_t(x - I)))^2]` per sample.

    Perturbations :math:`I \sim \mathcal N(0, \sigma^2)` (``stdev``, absolute), or the pre-drawn
    ``perturbations`` of shape ``(n_samples, *x.shape)``. With ``normalize=True`` the attributions
    are first rescaled by the optimal :math:`\beta` (Captum's ``normalize``). Evaluated as batches
    of ``chunk_size`` perturbations per sample.

    Returns:
        Tensor of shape ``(B,)``.
    References:
        [1] Yeh et al. On the (In)fidelity and Sensitivity of Explanations. NeurIPS 2019.
    """
    from .core import as_tuple, check_positive_int, eager_no_grad
    from .gradients import _check_distribution, _noise_for
    from .perturbation import _evaluate

    # evaluates the model at x before the perturbations: that checks the target first
    xs, params, _, batch, t = prepare_call(model_fn, params, x, target, check_finite=False, check_output=False)
    attrs = _matching(attributions, xs)
    check_positive_int(n_samples, "n_samples")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if perturbations is not None:
        first = tuple(p[:, 0] for p in as_tuple(perturbations, "perturbations")[0])
        _check_distribution(first, xs, "perturbations[:, 0]", check_finite=False)
    eps = _noise_for(xs, perturbations, n_samples, stdev, generator)
    n = eps[0].shape[0]
    with eager_no_grad():
        fx = select(model_fn(params, *xs), t)
        fp = _evaluate(model_fn, params, t, n, chunk_size, lambda lo, hi: tuple(xi.unsqueeze(0) - e[lo:hi] for xi, e in zip(xs, eps)))
        dot = sum((e * a.unsqueeze(0)).reshape(n, batch, -1).sum(2) for e, a in zip(eps, attrs))  # (n, B)
        diff = fx.unsqueeze(0) - fp
        if normalize:
            beta = (dot * diff).mean(0) / (dot * dot).mean(0).clamp(min=torch.finfo(dot.dtype).tiny)
            dot = dot * beta.unsqueeze(0)
        return ((dot - diff) ** 2).mean(0)


@forward_args
def sensitivity_max(
    attribute: Any,
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    radius: float = 0.02,
    n_samples: int = 10,
    generator: torch.Generator | None = None,
    perturbations: TensorOrTuple | None = None,
    chunk_size: int | None = None,
    **method_kwargs: Any,
) -> Tensor:
    r"""Max-sensitivity [1]: :math:`\max_{\|\delta\|_\infty \le r} \|A(x+\delta) - A(x)\|_F / \|A(x)\|_F`.

    Estimated with ``n_samples`` draws :math:`\delta \sim U[-r, r]` (or the pre-drawn
    ``perturbations``, shape ``(n_samples, *x.shape)``); a zero-norm explanation divides by 1,
    as in Captum. ``attribute`` is any attrax method, called with ``method_kwargs``.

    Returns:
        Tensor of shape ``(B,)``.
    References:
        [1] Yeh et al. On the (In)fidelity and Sensitivity of Explanations. NeurIPS 2019.
    """
    from .core import as_tuple, check_nonnegative, check_positive_int, chunks
    from .gradients import _rand, attribute_copies

    # the first attribute call, on x itself, checks the target in the user's terms
    xs, params, is_tuple, batch, t = prepare_call(model_fn, params, x, target, check_finite=False, check_output=False)
    check_positive_int(n_samples, "n_samples")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    r = check_nonnegative(radius, "radius")
    if perturbations is not None:
        deltas, _ = as_tuple(perturbations, "perturbations")
    else:
        deltas = tuple((_rand((n_samples, *xi.shape), xi, generator) * 2 - 1) * r for xi in xs)
    with training_warned():  # the metric's own boundary check warned already
        base, _ = as_tuple(attribute(model_fn, params, x if is_tuple else xs[0], target, **method_kwargs),
                           "attribute(...)")
    base_flat = torch.cat([b.reshape(batch, -1) for b in base], 1)
    norm = base_flat.norm(dim=1)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    best = None
    for lo, hi in chunks(deltas[0].shape[0], chunk_size):
        copies = tuple(xi.unsqueeze(0) + d[lo:hi] for xi, d in zip(xs, deltas))
        attrs = attribute_copies(attribute, model_fn, params, copies, is_tuple, target, t, method_kwargs)
        flat = torch.cat([a.reshape(a.shape[0], batch, -1) for a in attrs], 2)
        sens = (flat - base_flat.unsqueeze(0)).norm(dim=2) / norm.unsqueeze(0)  # (k, B)
        chunk_best = sens.amax(0)
        best = chunk_best if best is None else torch.maximum(best, chunk_best)
    assert best is not None
    return best


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve: ``scores`` ``(B, steps + 1)`` at ``fractions`` ``(steps + 1,)``,
    and its area ``auc`` ``(B,)`` (trapezoid rule over the fractions)."""

    fractions: Tensor
    scores: Tensor
    auc: Tensor


@forward_args
def deletion_curve(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    attributions: TensorOrTuple,
    *,
    steps: int = 20,
    baseline: Any = 0.0,
    chunk_size: int | None = None,
) -> Curve:
    r"""Deletion (pixel flipping) [1]: the target score as the most relevant features are replaced by
    ``baseline`` in order of decreasing attribution, at fractions ``0, 1/steps, ..., 1``.

    A faithful attribution makes the score fall fast: a small area under the curve. Features are
    ranked per sample across all inputs of a tuple; ties keep their flattened order.

    References:
        [1] Samek et al. Evaluating the Visualization of What a Deep Neural Network Has Learned.
            IEEE TNNLS 28(11), 2017.
    """
    return _flip_curve(model_fn, params, x, target, attributions, steps, baseline, chunk_size, insert=False)


@forward_args
def insertion_curve(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    attributions: TensorOrTuple,
    *,
    steps: int = 20,
    baseline: Any = 0.0,
    chunk_size: int | None = None,
) -> Curve:
    r"""Insertion [1]: the target score as the most relevant features of ``x`` are written into
    ``baseline``, most relevant first. A faithful attribution makes the score rise fast: a large AUC.

    References:
        [1] Petsiuk, Das, Saenko. RISE: Randomized Input Sampling for Explanation of Black-box
            Models. BMVC 2018.
    """
    return _flip_curve(model_fn, params, x, target, attributions, steps, baseline, chunk_size, insert=True)


def _flip_curve(model_fn: ModelFn, params: Params, x: Any, target: Target, attributions: Any, steps: int,
                baseline: Any, chunk_size: int | None, insert: bool) -> Curve:
    from .core import check_positive_int, eager_no_grad
    from .perturbation import _evaluate

    xs, params, _, batch, t = prepare_call(model_fn, params, x, target, check_finite=False, check_output=True)
    attrs = _matching(attributions, xs)
    check_positive_int(steps, "steps")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    bs = baselines_for(baseline, xs, check_finite=False)
    sizes = [xi[0].numel() for xi in xs]
    total = sum(sizes)
    flat_attr = torch.cat([a.reshape(batch, -1) for a in attrs], 1)
    order = flat_attr.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(total, device=order.device).expand(batch, total))
    counts = torch.tensor([round(s * total / steps) for s in range(steps + 1)], device=order.device)

    def make(lo: int, hi: int) -> tuple[Tensor, ...]:
        chosen = rank.unsqueeze(0) < counts[lo:hi].reshape(-1, 1, 1)  # (k, B, total): features switched
        out, start = [], 0
        for xi, b, n in zip(xs, bs, sizes):
            sel = chosen[:, :, start : start + n].reshape(hi - lo, *xi.shape)
            src, dst = (xi, b) if insert else (b, xi)
            out.append(torch.where(sel, src.unsqueeze(0), dst.unsqueeze(0)))
            start += n
        return tuple(out)

    with eager_no_grad():
        scores = _evaluate(model_fn, params, t, steps + 1, chunk_size, make).T  # (B, steps + 1)
    fractions = counts.to(scores.dtype) / total
    auc = torch.trapezoid(scores, fractions, dim=1)
    return Curve(fractions, scores, auc)


def _matching(attributions: Any, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    from .core import as_tuple

    attrs, _ = as_tuple(attributions, "attributions")
    if len(attrs) != len(xs) or any(a.shape != xi.shape for a, xi in zip(attrs, xs)):
        raise ValueError(
            f"attributions must match x: got shapes {[tuple(a.shape) for a in attrs]}, "
            f"expected {[tuple(xi.shape) for xi in xs]}"
        )
    return attrs
