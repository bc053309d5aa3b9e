r"""The gradient family: gradient, saliency, input x gradient, integrated gradients,
noise tunnel / SmoothGrad and GradientSHAP.

Every method is a pure function of ``(model_fn, params, x, target)`` built on
``torch.func.vjp``. Methods that evaluate the model at several points per sample
(quadrature steps, noise draws, baseline draws) fold ``k`` points into the batch
dimension, so one model call sees ``k * B`` rows; ``chunk_size`` bounds ``k``.
Folding was measured faster than ``vmap`` over the points and is exact for any
model whose samples do not interact (eval mode); see ``notes/decisions.md``.

Adaptive Integrated Gradients (``n_steps="auto"``) lives in :mod:`attrax.adaptive`, the gradient
of the selected output and the quadrature path sums in :mod:`attrax._grad`; both are re-exported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ._grad import _fold, _pack, call_baseline, grad_of_selected, path_gradient_sum, quadrature
from ._types import AttributionFn, ModelFn, Params, Target, TensorOrTuple
from .adaptive import AdaptiveIG, adaptive_integrated_gradients
from .core import (
    forward_args,
    as_tuple,
    eager_no_grad,
    training_warned,
    baselines_for,
    check_finite_tensor,
    check_generator,
    check_nonnegative,
    check_positive_int,
    chunks,
    publish_output,
)
from .targets import PerSampleIndex, ResolvedTarget, prepare_call, repeat_target, select

__all__ = [
    "AdaptiveIG",
    "adaptive_integrated_gradients",
    "gradient",
    "gradient_shap",
    "input_x_gradient",
    "integrated_gradients",
    "noise_tunnel",
    "saliency",
    "smoothgrad",
]

QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
NOISE_KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def convergence_delta(
    model_fn: ModelFn, params: Params, xs: tuple[Tensor, ...], bs: tuple[Tensor, ...], target: ResolvedTarget,
    attrs: tuple[Tensor, ...],
) -> Tensor:
    r"""``ax.metrics.completeness_delta`` from the method's own values: :math:`\sum a - (f_t(x) - f_t(x'))`, ``(B,)``.

    The forward at ``x`` is offered to an enclosing ``value_and_attribution``."""
    with eager_no_grad():
        out = model_fn(params, *xs)
        publish_output(xs, out)
        span = select(out, target) - select(model_fn(params, *bs), target)
    total = sum(a.reshape(a.shape[0], -1).sum(1) for a in attrs)
    return total - span.to(total.dtype)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(enabled: Any, total: int, desc: str, unit: str) -> Iterator[Any]:
    """A tqdm bar over ``total`` units when ``enabled`` (tqdm is optional: a clear ImportError
    when it is missing); a no-op otherwise and under ``torch.compile``."""
    if not check_flag(enabled, "progress") or torch.compiler.is_compiling():
        yield _NoBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError as e:
        raise ImportError("progress=True shows a tqdm progress bar, but tqdm is not installed: pip install tqdm "
                          "(or leave progress=False)") from e
    bar = tqdm(total=total, desc=desc, unit=unit)
    try:
        yield bar
    finally:
        bar.close()


@forward_args
def gradient(
    model_fn: ModelFn, params: Params, x: TensorOrTuple, target: Target, *, check_finite: bool = True
) -> TensorOrTuple:
    r"""Gradient of the selected output with respect to the input.

    Computes :math:`\partial f_t(x) / \partial x` per sample.

    Args:
        model_fn: Maps ``(params, *x)`` to outputs of shape ``(B, ...)``.
        params: Parameters and buffers passed to ``model_fn``.
        x: Input batch ``(B, ...)`` or a tuple of them.
        target: Selects one scalar per sample (API.md section 2).
        check_finite: Reject NaN/inf in ``x``.
    Returns:
        Attributions with the shape, dtype and device of ``x``.
    Raises:
        TypeError, ValueError: On a bad ``model_fn``, ``x`` or ``target``.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(3, 2, bias=False).eval())
        >>> g = ax.gradient(model_fn, params, torch.ones(1, 3), 0)
        >>> torch.allclose(g[0], params["weight"][0])
        True
    """
    xs, params, is_tuple, _, t = prepare_call(model_fn, params, x, target, check_finite=check_finite, check_output=False)
    return _pack(grad_of_selected(model_fn, params, xs, t, publish=True), is_tuple)


@forward_args
def saliency(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    abs: bool = True,
    check_finite: bool = True,
) -> TensorOrTuple:
    r"""Saliency map: :math:`|\partial f_t(x)/\partial x|` (the gradient itself when ``abs=False``).

    Args:
        abs: Take the absolute value of the gradient, as in [1] and Captum.
        (others as in :func:`gradient`)
    Returns:
        Attributions with the shape, dtype and device of ``x``.
    References:
        [1] Simonyan, Vedaldi, Zisserman. Deep Inside Convolutional Networks. arXiv:1312.6034.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(3, 2).eval())
        >>> bool((ax.saliency(model_fn, params, torch.ones(2, 3), 1) >= 0).all())
        True
    """
    xs, params, is_tuple, _, t = prepare_call(model_fn, params, x, target, check_finite=check_finite, check_output=False)
    grads = grad_of_selected(model_fn, params, xs, t, publish=True)
    return _pack(tuple(g.abs() for g in grads) if abs else grads, is_tuple)


@forward_args
def input_x_gradient(
    model_fn: ModelFn, params: Params, x: TensorOrTuple, target: Target, *, check_finite: bool = True
) -> TensorOrTuple:
    r"""Input times gradient: :math:`x \odot \partial f_t(x)/\partial x`.

    References:
        [1] Shrikumar et al. Not Just a Black Box. arXiv:1605.01713.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(3, 1, bias=False).eval())
        >>> x = torch.randn(2, 3)
        >>> a = ax.input_x_gradient(model_fn, params, x, None)
        >>> torch.allclose(a.sum(1), model_fn(params, x)[:, 0])
        True
    """
    xs, params, is_tuple, _, t = prepare_call(model_fn, params, x, target, check_finite=check_finite, check_output=False)
    grads = grad_of_selected(model_fn, params, xs, t, publish=True)
    return _pack(tuple(xi * g for xi, g in zip(xs, grads)), is_tuple)


# ------------------------------------------------------------------ integrated gradients


def check_quadrature(method: Any, n_steps: Any) -> None:
    if isinstance(n_steps, str):
        raise ValueError(f'n_steps must be a positive int or "auto"; got {n_steps!r}')
    check_positive_int(n_steps, "n_steps")
    if method not in QUADRATURES:
        raise ValueError(f"method must be one of {', '.join(QUADRATURES)}; got {method!r}")
    if method == "riemann_trapezoid" and n_steps < 2:
        raise ValueError(f"riemann_trapezoid needs n_steps >= 2, got {n_steps}")


@forward_args
def integrated_gradients(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    baseline: Tensor | float | tuple[Any, ...] | None = None,
    n_steps: int | str = 50,
    method: str = "gausslegendre",
    chunk_size: int | None = None,
    check_finite: bool = True,
    rtol: float = 0.01,
    max_steps: int = 512,
    multiply_by_inputs: bool = True,
    return_convergence_delta: bool = False,
    progress: bool = False,
) -> TensorOrTuple | tuple[TensorOrTuple, Tensor]:
    r"""Integrated Gradients along the straight path from ``baseline`` to ``x``.

    Computes :math:`(x_i - x'_i)\int_0^1 \partial_i f_t(x' + \alpha(x - x'))\,d\alpha`
    (Eq. 1 of [1]) with an ``n_steps``-point quadrature ([1] uses the Riemann case).
    With ``gausslegendre`` the completeness gap
    :math:`\sum_i a_i - (f_t(x) - f_t(x'))` vanishes fastest for smooth models.

    Args:
        model_fn: Maps ``(params, *x)`` to outputs of shape ``(B, ...)``.
        params: Parameters and buffers passed to ``model_fn``.
        x: Input batch, or a tuple of them.
        target: Selects one scalar per sample.
        baseline: Reference input :math:`x'`: zeros when ``None``, a number, or a
            tensor broadcastable to ``x`` (a tuple of these for tuple inputs), or a callable
            ``baseline(x)`` returning one of these (``baseline()`` if it takes no arguments).
        n_steps: Model evaluations per sample, or ``"auto"``: per sample, refine the quadrature
            until the completeness gap is under ``rtol`` x :math:`|f(x) - f(x')|` or ``max_steps``
            evaluations are spent (:func:`adaptive_integrated_gradients`, which also reports the
            steps and evaluations used).
        method: ``gausslegendre`` or ``riemann_{left,right,middle,trapezoid}``
            (nodes as in API.md section 7; the trapezoid rule is the true one,
            unlike Captum's, see ``notes/decisions.md``).
        chunk_size: At most this many steps per sample are evaluated in one
            model call (``chunk_size * B`` rows); ``None`` evaluates all at once.
        check_finite: Reject NaN/inf in ``x``.
        multiply_by_inputs: With False, return the path-integrated gradient
            :math:`\int_0^1 \partial_i f_t(x' + \alpha(x - x'))\,d\alpha` without the factor
            :math:`(x_i - x'_i)` (Captum's ``multiply_by_inputs=False``, "local" attributions).
        return_convergence_delta: Also return the signed completeness gap
            :math:`\sum_i a_i - (f_t(x) - f_t(x'))` per sample, shape ``(B,)`` (as
            ``ax.metrics.completeness_delta``; Captum's delta, same sign); costs two forwards.
        progress: Show a tqdm progress bar over the steps (advancing per chunk of ``chunk_size``).
    Returns:
        Attributions with the shape, dtype and device of ``x``; ``(attributions, delta)`` with
        ``return_convergence_delta``.
    Raises:
        ValueError: If ``n_steps < 1``, ``method`` is unknown, ``baseline``
            does not broadcast to ``x``, or a convergence delta is asked of local attributions.
    References:
        [1] Sundararajan, Taly, Yan. Axiomatic Attribution for Deep Networks.
            ICML 2017. arXiv:1703.01365.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Tanh()).eval())
        >>> x = torch.randn(2, 3, dtype=torch.float64); params = {k: v.double() for k, v in params.items()}
        >>> a = ax.integrated_gradients(model_fn, params, x, None, n_steps=32)
        >>> bool(ax.metrics.completeness_delta(model_fn, params, x, None, a).abs().max() < 1e-8)
        True
    """
    _check_delta_flags(multiply_by_inputs, return_convergence_delta)
    if n_steps == "auto":
        if method != "gausslegendre":
            raise ValueError(f'n_steps="auto" uses Gauss-Legendre steps; got method={method!r}')
        if check_flag(progress, "progress"):
            raise ValueError('progress=True needs a fixed n_steps; n_steps="auto" refines per sample in rounds')
        if not multiply_by_inputs:
            raise ValueError('n_steps="auto" chooses steps by completeness, which holds for attributions multiplied by the inputs; '
                             "use a fixed n_steps with multiply_by_inputs=False")
        xs, checked, is_tuple, _, t = prepare_call(model_fn, params, x, target, check_finite=check_finite)
        bs = baselines_for(call_baseline(baseline, xs, is_tuple), xs, check_finite=check_finite)  # evaluated once
        result = adaptive_integrated_gradients(
            model_fn, params, x, target, baseline=_pack(bs, is_tuple), rtol=rtol, max_steps=max_steps,
            chunk_size=chunk_size, check_finite=check_finite,
        ).attributions
        if not return_convergence_delta:
            return result
        return result, convergence_delta(model_fn, checked, xs, bs, t, as_tuple(result)[0])
    xs, params, is_tuple, _, t = prepare_call(model_fn, params, x, target, check_finite=check_finite, check_output=True)
    check_quadrature(method, n_steps)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    bs = baselines_for(call_baseline(baseline, xs, is_tuple), xs, check_finite=check_finite)
    alphas, weights = quadrature(method, n_steps)
    with progress_bar(progress, n_steps, "Integrated Gradients", "step") as bar:
        sums = path_gradient_sum(model_fn, params, xs, bs, t, alphas, weights, chunk_size, bar)
    attrs = tuple(s * (xi - b) for s, xi, b in zip(sums, xs, bs)) if multiply_by_inputs else sums
    if return_convergence_delta:
        return _pack(attrs, is_tuple), convergence_delta(model_fn, params, xs, bs, t, attrs)
    return _pack(attrs, is_tuple)


def _check_delta_flags(multiply_by_inputs: Any, return_convergence_delta: Any) -> None:
    if not check_flag(multiply_by_inputs, "multiply_by_inputs") and check_flag(
            return_convergence_delta, "return_convergence_delta"):
        raise ValueError("return_convergence_delta=True needs multiply_by_inputs=True: the completeness gap "
                         "sum(attr) - (f(x) - f(baseline)) is defined for attributions multiplied by the inputs, not for local "
                         "ones (the gradients without the (x - baseline) factor)")


# ------------------------------------------------------------------------ noise tunnel


@forward_args
def noise_tunnel(
    attribute: AttributionFn | Callable[..., TensorOrTuple],
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    n_samples: int = 25,
    stdev: float = 1.0,
    kind: str = "smoothgrad",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    noise: TensorOrTuple | None = None,
    check_finite: bool = True,
    progress: bool = False,
    **method_kwargs: Any,
) -> TensorOrTuple:
    r"""Average any method over noisy copies of the input (SmoothGrad and relatives).

    With :math:`\epsilon_k \sim \mathcal N(0, \sigma^2)` and :math:`A` the wrapped method,
    ``smoothgrad`` is :math:`\frac1n\sum_k A(x+\epsilon_k)` [1], ``smoothgrad_sq`` is
    :math:`\frac1n\sum_k A(x+\epsilon_k)^2` and ``vargrad`` is the population variance
    :math:`\frac1n\sum_k A^2 - (\frac1n\sum_k A)^2` [2].

    The wrapped method is called with the standard signature: ``chunk_size`` noisy
    copies are stacked into one batch of ``chunk_size * B`` rows and the method is
    called once per chunk (as Captum does; exact for models whose samples do not
    interact). Per-sample arguments are repeated alongside the copies: the target,
    and keyword arguments with one entry per sample, such as a baseline or
    feature mask of shape ``(B, ...)`` or a tuple of them for tuple inputs (see
    ``_repeat_per_sample``); other keyword arguments are passed unchanged.

    Args:
        attribute: Any attrax method, e.g. ``ax.saliency``.
        n_samples: Number of noisy copies per sample.
        stdev: Noise standard deviation, absolute (units of ``x``).
        kind: ``smoothgrad``, ``smoothgrad_sq`` or ``vargrad``.
        generator: Source of the noise; the same generator state gives the same result.
        chunk_size: At most this many noisy copies are evaluated at once.
        noise: Pre-drawn noise of shape ``(n_samples, *x.shape)`` (a tuple for
            tuple inputs), used instead of drawing; ``stdev`` and ``generator``
            are then ignored.
        progress: Show a tqdm progress bar over the noisy copies (advancing per chunk).
        **method_kwargs: Passed to ``attribute``; per-sample tensors (first dim ``B``) repeated
            alongside the noisy copies, elementwise in tuples. A callable ``baseline`` passes
            unchanged, so the wrapped method calls it on the noisy copies.
    Returns:
        Attributions with the shape, dtype and device of ``x``.
    References:
        [1] Smilkov et al. SmoothGrad: removing noise by adding noise. arXiv:1706.03825.
        [2] Adebayo et al. Local Explanation Methods for Deep Neural Networks Lack
            Sensitivity to Parameter Values. arXiv:1810.03307.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(3, 2).eval())
        >>> g = torch.Generator().manual_seed(0)
        >>> a = ax.noise_tunnel(ax.gradient, model_fn, params, torch.ones(4, 3), 1, n_samples=8, stdev=0.1, generator=g)
        >>> torch.allclose(a, params["weight"][1].expand(4, 3))
        True
    """
    if not callable(attribute):
        raise TypeError(f"attribute must be an attrax method such as ax.saliency, got {type(attribute).__name__}")
    # ax.neuron methods take a neuron of a layer in the target's place: not checked against the model's output
    on_output = not getattr(attribute, "target_is_neuron", False)
    xs, params, is_tuple, _, t = prepare_call(model_fn, params, x, target, check_finite=check_finite,
                                              check_output=on_output)
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(NOISE_KINDS)}; got {kind!r}")
    if method_kwargs.get("return_convergence_delta"):
        raise ValueError("noise_tunnel averages attributions and returns no convergence delta; drop "
                         "return_convergence_delta and use ax.metrics.completeness_delta on the result if needed")
    check_positive_int(n_samples, "n_samples")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    eps = _noise_for(xs, noise, n_samples, stdev, generator)
    n = eps[0].shape[0]

    total = [torch.zeros_like(xi) for xi in xs]
    total_sq = [torch.zeros_like(xi) for xi in xs]
    with progress_bar(progress, n, "Noise tunnel", "sample") as bar:
        for start, stop in chunks(n, chunk_size):
            noisy = tuple(xi.unsqueeze(0) + e[start:stop] for xi, e in zip(xs, eps))
            attrs = attribute_copies(attribute, model_fn, params, noisy, is_tuple, target, t, method_kwargs)
            total = [s + a.sum(0) for s, a in zip(total, attrs)]
            if kind != "smoothgrad":
                total_sq = [s + (a * a).sum(0) for s, a in zip(total_sq, attrs)]
            bar.update(stop - start)
    if kind == "smoothgrad":
        result = tuple(s / n for s in total)
    elif kind == "smoothgrad_sq":
        result = tuple(s / n for s in total_sq)
    else:
        result = tuple(sq / n - (s / n) ** 2 for s, sq in zip(total, total_sq))
    return _pack(result, is_tuple)


def attribute_copies(
    attribute: Callable[..., TensorOrTuple],
    model_fn: ModelFn,
    params: Params,
    copies: tuple[Tensor, ...],
    is_tuple: bool,
    target: Target,
    resolved: ResolvedTarget,
    method_kwargs: dict[str, Any],
) -> tuple[Tensor, ...]:
    """``attribute`` on ``k`` modified copies of the batch (``(k, B, ...)`` per input) -> ``(k, B, ...)``.

    The copies are stacked into one batch of ``k * B`` rows and the method is called once (exact
    for models whose samples do not interact), with the per-sample arguments repeated alongside:
    the target and the per-sample keyword arguments (``_repeat_per_sample``).
    """
    k = copies[0].shape[0]
    flat = tuple(_fold(c) for c in copies)
    like = tuple(c[0] for c in copies)  # one copy: shaped like the user's inputs
    kwargs = {name: _repeat_per_sample(value, name, like, k) for name, value in method_kwargs.items()}
    with training_warned():
        out, _ = as_tuple(
            attribute(model_fn, params, _pack(flat, is_tuple), _repeat_raw(target, resolved, k), **kwargs),
            "attribute(...)",
        )
    return tuple(a.reshape(c.shape) for a, c in zip(out, copies))


#: Keyword arguments that hold a distribution or draws, never one entry per sample.
_NOT_PER_SAMPLE = frozenset(("baselines", "noise", "perturbations"))


def _repeat_per_sample(value: Any, name: str, xs: tuple[Tensor, ...], k: int) -> Any:
    """A keyword argument for a batch of ``k`` stacked copies of the batch ``xs``.

    A tensor holds one entry per sample when its first dim is the batch size ``B`` and it has at
    least the dims of the input it goes with (a ``baseline`` or ``feature_mask`` of shape
    ``(B, ...)``; one with fewer dims broadcasts against ``x`` from the trailing dims, so it is
    shared by all samples). Such tensors are repeated ``k`` times along dim 0, in the order of
    the copies; tuples and lists elementwise, entry ``i`` going with input ``i`` when there is
    one entry per input. ``additional_forward_args`` follow API.md section 9: every tensor whose
    first dim is ``B``. Distributions (``baselines``) and draws pass unchanged.
    """
    if name in _NOT_PER_SAMPLE:
        return value
    batch = xs[0].shape[0]
    any_dims = name == "additional_forward_args"

    def rep(v: Any, dims: int) -> Any:
        if isinstance(v, Tensor):
            if v.ndim >= 1 and v.shape[0] == batch and (any_dims or v.ndim >= dims):
                return v.repeat(k, *([1] * (v.ndim - 1)))
            return v
        if isinstance(v, (tuple, list)):
            per_input = not any_dims and len(v) == len(xs)
            items = [rep(e, xs[i].ndim if per_input else dims) for i, e in enumerate(v)]
            return items if isinstance(v, list) else tuple(items)
        return v

    return rep(value, min(x.ndim for x in xs))


def _repeat_raw(target: Target, resolved: ResolvedTarget, times: int) -> Target:
    """The user's target for a batch of ``times`` stacked copies (per-sample targets tiled)."""
    if resolved.kind == "tensor" and resolved.value.ndim == 1:
        return resolved.value.repeat(times)
    if isinstance(resolved.value, PerSampleIndex):
        return resolved.value.repeat(times)  # a selector: the wrapped method takes it as a callable target
    return target


def _noise_for(
    xs: tuple[Tensor, ...],
    noise: TensorOrTuple | None,
    n_samples: int,
    stdev: Any,
    generator: torch.Generator | None,
) -> tuple[Tensor, ...]:
    if noise is not None:
        eps, _ = as_tuple(noise, "noise")
        if len(eps) != len(xs):
            raise ValueError(f"noise has {len(eps)} entries but x has {len(xs)} inputs")
        for e, xi in zip(eps, xs):
            if e.ndim != xi.ndim + 1 or tuple(e.shape[1:]) != tuple(xi.shape):
                raise ValueError(f"noise must have shape (n_samples, *x.shape) = (n, {', '.join(map(str, xi.shape))}), got {tuple(e.shape)}")
        return tuple(e.to(dtype=xi.dtype, device=xi.device) for e, xi in zip(eps, xs))
    sd = check_nonnegative(stdev, "stdev")
    check_generator(generator)
    return tuple(_randn((n_samples, *xi.shape), xi, generator) * sd for xi in xs)


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


@forward_args
def smoothgrad(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    n_samples: int = 25,
    stdev: float = 1.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    noise: TensorOrTuple | None = None,
    check_finite: bool = True,
    progress: bool = False,
) -> TensorOrTuple:
    r"""SmoothGrad [1]: the mean gradient over ``n_samples`` noisy copies of ``x``.

    Same as ``noise_tunnel(ax.gradient, ..., kind="smoothgrad")``; ``stdev`` is absolute.
    ``noise`` (shape ``(n_samples, *x.shape)``) replaces drawing and ``progress`` shows a bar,
    as in :func:`noise_tunnel`.

    References:
        [1] Smilkov et al. SmoothGrad: removing noise by adding noise. arXiv:1706.03825.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(3, 2).eval())
        >>> a = ax.smoothgrad(model_fn, params, torch.ones(2, 3), 0, n_samples=4, generator=torch.Generator().manual_seed(0))
        >>> a.shape
        torch.Size([2, 3])
    """
    return noise_tunnel(
        gradient, model_fn, params, x, target, n_samples=n_samples, stdev=stdev, kind="smoothgrad",
        generator=generator, chunk_size=chunk_size, noise=noise, check_finite=check_finite, progress=progress,
    )


# ----------------------------------------------------------------------- gradient shap


@forward_args
def gradient_shap(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    baselines: TensorOrTuple,
    *,
    n_samples: int = 5,
    stdev: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    check_finite: bool = True,
    multiply_by_inputs: bool = True,
    return_convergence_delta: bool = False,
) -> TensorOrTuple | tuple[TensorOrTuple, Tensor]:
    r"""GradientSHAP [1]: expected gradients at random points between random baselines and noisy inputs.

    For each sample and each of ``n_samples`` draws, picks a baseline :math:`x'`
    uniformly from ``baselines``, noise :math:`\epsilon \sim \mathcal N(0,\sigma^2)` and
    :math:`\alpha \sim U(0, 1)`, and averages
    :math:`\nabla f_t(x' + \alpha(x + \epsilon - x')) \odot (x + \epsilon - x')`.
    This is Captum's ``GradientShap`` estimator.

    Args:
        baselines: Reference distribution, shape ``(N, *x.shape[1:])`` (a tuple for tuple inputs),
            or a callable ``baselines(x)`` returning it (``baselines()`` if it takes no
            arguments), as Captum.
        n_samples: Draws per sample.
        stdev: Input noise standard deviation, absolute.
        generator: Source of all draws.
        chunk_size: At most this many draws per sample are evaluated at once.
        multiply_by_inputs: With False, average the gradients alone, without the factor
            :math:`(x + \epsilon - x')` (Captum's ``multiply_by_inputs=False``, "local").
        return_convergence_delta: Also return, per sample, ``(B,)``, the signed gap
            :math:`\sum_i a_i - \frac1n\sum_k (f_t(x + \epsilon_k) - f_t(x'_k))` over the draws
            used: the mean over the draws of Captum's per-draw deltas (Captum returns those
            ``B * n_samples`` values themselves, sample-major). Costs ``2 n_samples`` forwards per sample.
    Returns:
        Attributions with the shape, dtype and device of ``x``; ``(attributions, delta)`` with
        ``return_convergence_delta``.
    References:
        [1] Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(3, 1, bias=False).eval())
        >>> x, bl = torch.randn(2, 3), torch.zeros(5, 3)
        >>> a = ax.gradient_shap(model_fn, params, x, None, bl, n_samples=3, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(a, x * params["weight"][0])
        True
    """
    _check_delta_flags(multiply_by_inputs, return_convergence_delta)
    xs, params, is_tuple, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite, check_output=True)
    check_positive_int(n_samples, "n_samples")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    sd = check_nonnegative(stdev, "stdev")
    check_generator(generator)
    bls = _check_distribution(call_baseline(baselines, xs, is_tuple), xs, "baselines", check_finite=check_finite)
    n_ref = bls[0].shape[0]
    device = generator.device if generator is not None else xs[0].device
    idx = torch.randint(n_ref, (n_samples, batch), generator=generator, device=device).to(xs[0].device)
    noise = tuple(_randn((n_samples, *xi.shape), xi, generator) * sd for xi in xs)
    alpha = _rand((n_samples, batch), xs[0], generator)
    chosen = tuple(b[idx] for b in bls)
    attrs = gradient_shap_from_draws(model_fn, params, xs, t, chosen, alpha, noise, chunk_size, multiply_by_inputs)
    if not return_convergence_delta:
        return _pack(attrs, is_tuple)
    total = sum(a.reshape(batch, -1).sum(1) for a in attrs)
    return _pack(attrs, is_tuple), total - _mean_span(model_fn, params, xs, t, chosen, noise, chunk_size).to(total.dtype)


def _mean_span(model_fn: ModelFn, params: Params, xs: tuple[Tensor, ...], target: ResolvedTarget,
               chosen: tuple[Tensor, ...], noise: tuple[Tensor, ...], chunk_size: int | None) -> Tensor:
    r""":math:`\frac1n \sum_k f_t(x + \epsilon_k) - f_t(x'_k)` per sample, over the draws ``(n, B, ...)``."""
    n = noise[0].shape[0]
    total = torch.zeros(xs[0].shape[0], dtype=xs[0].dtype, device=xs[0].device)
    with eager_no_grad():
        for start, stop in chunks(n, chunk_size):
            k = stop - start
            t = repeat_target(target, k)
            ends = tuple(_fold(xi.unsqueeze(0) + e[start:stop]) for xi, e in zip(xs, noise))
            starts = tuple(_fold(b[start:stop]) for b in chosen)
            span = select(model_fn(params, *ends), t) - select(model_fn(params, *starts), t)
            total = total + span.reshape(k, -1).sum(0).to(total.dtype)
    return total / n


def _check_distribution(
    baselines: Any, xs: tuple[Tensor, ...], name: str, check_finite: bool = True
) -> tuple[Tensor, ...]:
    """A reference distribution ``(N, *x.shape[1:])`` per input, finite unless ``check_finite=False``."""
    bls, _ = as_tuple(baselines, name)
    if len(bls) != len(xs):
        raise ValueError(f"{name} has {len(bls)} entries but x has {len(xs)} inputs")
    out = []
    for i, (b, xi) in enumerate(zip(bls, xs)):
        label = f"{name}{'' if len(xs) == 1 else f'[{i}]'}"
        if b.ndim != xi.ndim or tuple(b.shape[1:]) != tuple(xi.shape[1:]) or b.shape[0] < 1:
            raise ValueError(
                f"{label} must have shape (N, {', '.join(map(str, xi.shape[1:]))}) with N >= 1, got {tuple(b.shape)}"
            )
        if check_finite:
            check_finite_tensor(b, label)
        out.append(b.to(dtype=xi.dtype, device=xi.device))
    return tuple(out)


def gradient_shap_from_draws(
    model_fn: ModelFn,
    params: Params,
    xs: tuple[Tensor, ...],
    target: ResolvedTarget,
    chosen: tuple[Tensor, ...],
    alpha: Tensor,
    noise: tuple[Tensor, ...],
    chunk_size: int | None,
    multiply_by_inputs: bool = True,
) -> tuple[Tensor, ...]:
    """GradientSHAP given the draws: baselines ``(n, B, ...)``, ``alpha`` ``(n, B)``, noise ``(n, B, ...)``
    (the mean gradient alone, without the factor ``x + noise - baseline``, when not ``multiply_by_inputs``)."""
    n = alpha.shape[0]
    total = [torch.zeros_like(xi) for xi in xs]
    for start, stop in chunks(n, chunk_size):
        k = stop - start
        diffs = tuple(xi.unsqueeze(0) + e[start:stop] - b[start:stop] for xi, e, b in zip(xs, noise, chosen))
        points = tuple(
            _fold(b[start:stop] + alpha[start:stop].view(k, -1, *([1] * (xi.ndim - 1))) * d)
            for xi, b, d in zip(xs, chosen, diffs)
        )
        grads = grad_of_selected(model_fn, params, points, repeat_target(target, k))
        total = [tot + (g.reshape(d.shape) * d if multiply_by_inputs else g.reshape(d.shape)).sum(0)
                 for tot, g, d in zip(total, grads, diffs)]
    return tuple(tot / n for tot in total)

