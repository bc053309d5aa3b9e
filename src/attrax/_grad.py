"""The gradient of the selected output and its sums along straight paths.

Shared by the gradient family (:mod:`attrax.gradients`) and adaptive Integrated Gradients
(:mod:`attrax.adaptive`), which both sit above this module, so neither imports the other's
internals; :mod:`attrax.gradients` re-exports these names.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._types import ModelFn, Params, TensorOrTuple
from .core import chunks, inside_transform, keeps_graph, map_tensors, publish_output
from .rewrite import forward, gradient_program
from .targets import ResolvedTarget, repeat_target, select

__all__ = ["call_baseline", "grad_of_selected", "path_gradient_sum", "quadrature"]


def _pack(attrs: tuple[Tensor, ...], is_tuple: bool) -> TensorOrTuple:
    return attrs if is_tuple else attrs[0]


def call_baseline(baseline: Any, xs: tuple[Tensor, ...], is_tuple: bool) -> Any:
    """A callable baseline evaluated on the inputs: ``baseline(x)`` (``x`` as the user passed it,
    a tensor or a tuple), or ``baseline()`` for a callable without parameters (as Captum); any
    other baseline unchanged. Called once per method call, on the batch the method sees (inside
    ``noise_tunnel``: on the noisy copies)."""
    if not callable(baseline) or isinstance(baseline, Tensor):
        return baseline
    try:
        takes_none = not inspect.signature(baseline).parameters
    except (TypeError, ValueError):  # builtins without a signature
        takes_none = False
    return baseline() if takes_none else baseline(_pack(xs, is_tuple))


def grad_of_selected(
    model_fn: ModelFn,
    params: Params,
    xs: tuple[Tensor, ...],
    target: ResolvedTarget,
    weights: Tensor | None = None,
    publish: bool = False,
) -> tuple[Tensor, ...]:
    """``d/dx sum_i w_i * f_{t_i}(x_i)`` for every input; ``w`` defaults to ones.

    Samples do not interact, so this is the per-sample gradient of the selected
    output, scaled by ``w``. With ``publish`` the model output at ``xs`` is offered to
    an enclosing ``value_and_attribution`` (see ``core.publish_output``).

    Under ``torch.inference_mode`` the gradient is taken in a local
    ``inference_mode(False)`` block: gradients need autograd only locally, and the
    inference tensors made meanwhile (the method's steps, weights, targets) are
    copied first, since autograd cannot record them.
    """
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            if target.kind == "tensor":
                target = replace(target, value=_normal(target.value))
            return grad_of_selected(
                model_fn,
                map_tensors(params, _normal),
                tuple(_normal(x) for x in xs),
                target,
                None if weights is None else _normal(weights),
                publish,
            )

    def weighted_sum(*inputs: Tensor) -> tuple[Tensor, Tensor]:
        if fast is None:
            out = model_fn(params, *inputs)
            sel = select(out, target)
        else:  # the program's output: the model's, or the rows the target reads (``selected``)
            program, drop, selected = fast
            out = forward(program, params, inputs, drop=drop)[program.output]
            sel = select(out, replace(target, value=rows[2]) if selected else target)
        return (sel.sum() if weights is None else (sel * weights.to(sel.dtype)).sum()), out

    fast = rows = None
    if not torch.compiler.is_compiling() and not inside_transform():
        # Eager: plain autograd measured 10-18 % faster and half the peak memory of
        # torch.func.grad on CNNs (notes/decisions.md). In value_and_attribution it records
        # the backward (create_graph) and keeps the inputs' own history; unlike torch.func.grad
        # it also allows the in-place running-statistics update of BatchNorm in training mode.
        keep = keeps_graph()
        # a traced program with activations written out in steps fused (rewrite.gradient_program), where the model
        # has such; not in value_and_attribution, whose graph w.r.t. params is the model's own
        # an LM target at one position names the rows it reads (attrax_rows = (dim, index, fn of those rows))
        rows = getattr(target.value, "attrax_rows", None) if target.kind == "callable" and not publish else None
        fast = None if keep else gradient_program(model_fn, params, xs, None if rows is None else rows[:2], count=True)
        leaves = tuple(x if keep and x.requires_grad else x.detach().requires_grad_() for x in xs)
        with torch.enable_grad():
            total, out = weighted_sum(*leaves)
        grads = torch.autograd.grad(total, leaves, create_graph=keep, allow_unused=True, materialize_grads=True)
        if publish:
            publish_output(xs, out)
        return grads
    # Composable path (transforms, compile). torch.func.grad, not vjp:
    # vjp's pullback may be called again, so it retains the graph and keeps every saved
    # activation alive through the backward. Under plain autograd its results stay
    # differentiable w.r.t. tensors captured from outside (params), and so does the output.
    grads, out = torch.func.grad(weighted_sum, argnums=tuple(range(len(xs))), has_aux=True)(*xs)
    if publish:
        publish_output(xs, out)
    return tuple(grads)


def _normal(t: Tensor) -> Tensor:
    """``t``, or a normal copy of it when it is an inference tensor (call outside inference mode)."""
    return t.clone() if t.is_inference() else t


@torch.compiler.assume_constant_result
def quadrature(method: str, n_steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes in [0, 1] and weights of an ``n_steps``-point rule (float64 accuracy).

    Riemann rules use nodes k/n (API.md section 7); ``riemann_trapezoid`` is the
    composite trapezoid rule on ``n`` equally spaced nodes including both ends
    (spacing 1/(n-1), end weights halved), which integrates linear functions
    exactly. Gauss-Legendre nodes come from ``numpy.polynomial.legendre.leggauss``
    mapped from [-1, 1] to [0, 1]. Marked constant for ``torch.compile`` so it is
    evaluated once at trace time, outside the compiled region.
    """
    n = n_steps
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return tuple(float(v) for v in (nodes + 1) / 2), tuple(float(v) for v in weights / 2)
    if method == "riemann_trapezoid":
        if n < 2:
            raise ValueError(f"riemann_trapezoid needs n_steps >= 2, got {n}")
        w = [1.0 / (n - 1)] * n
        w[0] = w[-1] = 0.5 / (n - 1)
        return tuple(k / (n - 1) for k in range(n)), tuple(w)
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return tuple((k + offset) / n for k in range(n)), (1.0 / n,) * n


def _fold(points: Tensor) -> Tensor:
    """``(k, B, ...)`` -> ``(k * B, ...)``."""
    return points.reshape(points.shape[0] * points.shape[1], *points.shape[2:])


def path_gradient_sum(
    model_fn: ModelFn,
    params: Params,
    xs: tuple[Tensor, ...],
    baselines: tuple[Tensor, ...],
    target: ResolvedTarget,
    alphas: tuple[float, ...],
    weights: tuple[float, ...],
    chunk_size: int | None,
    bar: Any = None,
) -> tuple[Tensor, ...]:
    r""":math:`\sum_k w_k \nabla f_t(x' + \alpha_k (x - x'))` per input, ``chunk_size`` steps at a time
    (``bar`` advanced by the steps of each chunk)."""
    batch = xs[0].shape[0]
    totals = [torch.zeros_like(x) for x in xs]
    for start, stop in chunks(len(alphas), chunk_size):
        k = stop - start
        ref = xs[0]
        a = torch.tensor(alphas[start:stop], dtype=ref.dtype, device=ref.device)
        w = torch.tensor(weights[start:stop], dtype=ref.dtype, device=ref.device).repeat_interleave(batch)
        points = tuple(
            _fold(b.unsqueeze(0) + a.view(k, *([1] * x.ndim)) * (x - b).unsqueeze(0))
            for x, b in zip(xs, baselines)
        )
        grads = grad_of_selected(model_fn, params, points, repeat_target(target, k), w)
        totals = [tot + g.reshape(k, *x.shape).sum(0) for tot, g, x in zip(totals, grads, xs)]
        if bar is not None:
            bar.update(k)
    return tuple(totals)
