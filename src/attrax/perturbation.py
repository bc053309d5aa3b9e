r"""Perturbation methods: occlusion, feature ablation, feature permutation, Shapley sampling,
exact Shapley values, KernelSHAP, LIME.

Model-agnostic methods evaluate the model on perturbed copies of the input. Here every
perturbation set is a batch: ``k`` perturbations of a ``B``-sample batch are built by
broadcasting (no Python loop over features) and evaluated in one model call of ``k * B`` rows,
``chunk_size`` perturbations per sample at a time. Randomness comes only from ``generator``,
and every draw is made before the first model call, so ``chunk_size`` never changes a result.

Feature groups (``feature_mask``) follow API.md: an integer tensor broadcastable to ``x`` (a
tuple of them for tuple inputs, sharing one id space), ids forming groups, every member of a
group receiving the group's full attribution; ``None`` makes every scalar its own group.

Baselines (every method but ``feature_permutation``): a number, a tensor broadcastable to
``x``, a tuple of those for tuple inputs, a mapping ``{group id: value}`` (not for occlusion,
which has no groups), or a callable ``baseline(x)`` returning one of these. Default 0.

Integer and boolean inputs (token ids, categorical codes) are accepted: values are only
copied between ``x`` and the baseline, never interpolated, so the baseline must hold values of
``x``'s dtype (a pad or mask id). Their attributions come back in the dtype of the model output
(API §3 promises ``x``'s dtype, which cannot hold them); floating inputs keep their own.
"""

from __future__ import annotations

import contextvars
import functools

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target, TensorOrTuple
from .core import (
    forward_args,
    _describe,
    as_tuple,
    broadcast_baseline,
    check_generator,
    check_positive_int,
    chunks,
    eager_no_grad,
    is_concrete,
)
from .targets import ResolvedTarget, prepare_call, repeat_target, select

__all__ = [
    "feature_ablation",
    "feature_permutation",
    "kernel_shap",
    "lime",
    "occlusion",
    "shapley_sampling",
    "shapley_values",
]

#: a baseline: a number, a tensor broadcastable to x, a tuple of those (one per input), a mapping
#: {group id: value} (per feature group), or a callable baseline(x) returning one of these
Baseline = Any


# --------------------------------------------------------------------------- shared


def _evaluate(model_fn: ModelFn, params: Params, target: ResolvedTarget, n_points: int, chunk_size: int | None,
              make: Callable[[int, int], tuple[Tensor, ...]]) -> Tensor:
    """Scores ``(n_points, B)`` of ``make(lo, hi)`` -> inputs ``(hi - lo, B, ...)``, chunk by chunk."""
    out = []
    bar = None if torch.compiler.is_compiling() else _BAR.get()  # (dynamo cannot read a context variable)
    for lo, hi in chunks(n_points, chunk_size):
        points = make(lo, hi)
        k, batch = points[0].shape[:2]
        flat = tuple(p.reshape(k * batch, *p.shape[2:]) for p in points)
        out.append(select(model_fn(params, *flat), repeat_target(target, k)).reshape(k, batch))
        if bar is not None:
            bar.update(hi - lo)
    return torch.cat(out)


def _drops(model_fn: ModelFn, params: Params, target: ResolvedTarget, xs: tuple[Tensor, ...], n_points: int,
           chunk_size: int | None, make: Callable[[int, int], tuple[Tensor, ...]]) -> Tensor:
    """Drops ``f(x) - f(point)`` ``(n_points, B)`` of ``make(lo, hi)``'s points, ``x`` scored in each chunk's call.

    Scoring ``x`` in the same model call as the points it is compared with makes a point that does
    not change the output (a masked pad token) drop by exactly zero: the same rows in batches of
    different sizes may round differently (HF GPT-2 and Llama, float64: 1e-17). A point equal to
    ``x`` drops by zero by definition (rows of one call may round differently too).
    """
    out = []
    bar = None if torch.compiler.is_compiling() else _BAR.get()  # (dynamo cannot read a context variable)
    for lo, hi in chunks(n_points, chunk_size):
        points = tuple(torch.cat([x_i.unsqueeze(0), p]) for x_i, p in zip(xs, make(lo, hi)))
        k, batch = points[0].shape[:2]
        flat = tuple(p.reshape(k * batch, *p.shape[2:]) for p in points)
        scores = select(model_fn(params, *flat), repeat_target(target, k)).reshape(k, batch)
        same = torch.ones(k - 1, batch, dtype=torch.bool, device=scores.device)
        for p in points:  # a point equal to x (its group already holds the baseline) drops by exactly zero
            same &= (p[1:] == p[:1]).reshape(k - 1, batch, -1).all(-1).to(scores.device)
        out.append((scores[:1] - scores[1:]).masked_fill(same, 0))
        if bar is not None:
            bar.update(hi - lo)
    return torch.cat(out)


#: the progress bar of the perturbation method running in this context (``progress=True``), else None
_BAR: contextvars.ContextVar[Any] = contextvars.ContextVar("attrax_perturbation_bar", default=None)


def _with_progress(desc: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a perturbation method ``progress=False``: with True, a tqdm bar counts the perturbed inputs
    evaluated (tqdm is optional; a clear ImportError when missing)."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, progress: bool = False, **kwargs: Any) -> Any:
            from .gradients import check_flag, progress_bar

            if torch.compiler.is_compiling():  # no bar in compiled code (progress_bar), and no context variable
                check_flag(progress, "progress")
                return method(*args, **kwargs)
            with progress_bar(progress, None, desc, "perturbation") as bar:
                token = _BAR.set(bar if progress else None)
                try:
                    return method(*args, **kwargs)
                finally:
                    _BAR.reset(token)

        return wrapper

    return decorate


def _score(model_fn: ModelFn, params: Params, xs: tuple[Tensor, ...], target: ResolvedTarget) -> Tensor:
    return select(model_fn(params, *xs), target)


def _pack(attrs: tuple[Tensor, ...], is_tuple: bool) -> TensorOrTuple:
    return attrs if is_tuple else attrs[0]


def feature_groups(feature_mask: Any, xs: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], int]:
    """Integer group ids broadcast to each input (batch dim 1 or B), and the number of groups."""
    if feature_mask is None:
        masks, offset = [], 0
        for x in xs:
            n = math.prod(x.shape[1:])  # not x[0].numel(): x may be an empty batch
            masks.append((torch.arange(n, device=x.device) + offset).reshape(1, *x.shape[1:]))
            offset += n
        return tuple(masks), offset
    fm, _ = as_tuple(feature_mask, "feature_mask")
    if len(fm) != len(xs):
        raise ValueError(f"feature_mask has {len(fm)} entries but x has {len(xs)} inputs")
    out = []
    for i, (m, x) in enumerate(zip(fm, xs)):
        label = "feature_mask" if len(xs) == 1 else f"feature_mask[{i}]"
        if m.is_floating_point() or m.is_complex() or m.dtype == torch.bool:
            raise TypeError(f"{label} must be an integer tensor of group ids, got dtype {m.dtype}")
        if m.ndim < x.ndim:
            m = m.reshape((1,) * (x.ndim - m.ndim) + tuple(m.shape))
        try:
            shape = torch.broadcast_shapes(m.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(f"{label} of shape {tuple(m.shape)} does not broadcast to x of shape {tuple(x.shape)}")
        m = m.to(device=x.device, dtype=torch.long)
        out.append(m.expand(m.shape[0], *x.shape[1:]))
    if any(bool((m < 0).any()) for m in out):
        raise ValueError("feature_mask ids must be >= 0")
    n = int(max(int(m.max()) for m in out)) + 1
    return tuple(out), n


def _members(groups: tuple[Tensor, ...], ids: Tensor) -> tuple[Tensor, ...]:
    """``(k, B or 1, ...)`` boolean membership of each input position in each of ``ids``."""
    return tuple(g.unsqueeze(0) == ids.reshape(-1, *([1] * g.ndim)) for g in groups)


def _spread(values: Tensor, groups: tuple[Tensor, ...], xs: tuple[Tensor, ...], dtypes: tuple[torch.dtype, ...]
            ) -> tuple[Tensor, ...]:
    """Give every member of group g the value ``values[:, g]`` (``values``: ``(B, n_groups)``)."""
    out = []
    for g, x, dtype in zip(groups, xs, dtypes):
        flat = g.expand(x.shape[0], *g.shape[1:]).reshape(x.shape[0], -1)
        out.append(values.gather(1, flat).reshape(x.shape).to(dtype))
    return tuple(out)


def _check_common(chunk_size: Any, generator: Any = None) -> None:
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_generator(generator)


def _attr_dtypes(xs: tuple[Tensor, ...], out_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The attribution dtype per input: ``x``'s own when floating, else the model output's.

    Integer and boolean inputs (token ids, categories) cannot hold attributions; theirs come back
    in the dtype of the selected model output (the default dtype if that is not floating either).
    """
    if not out_dtype.is_floating_point:
        out_dtype = torch.get_default_dtype()
    return tuple(x.dtype if x.is_floating_point() else out_dtype for x in xs)


def _empty(xs: tuple[Tensor, ...], is_tuple: bool, params: Params) -> TensorOrTuple:
    """The attributions of an empty batch: empty tensors shaped like ``x`` (the model is not called).

    Without a model output, discrete inputs get the dtype of the first floating parameter (the
    default dtype for a model without one), which is the output's for ordinary models.
    """
    out_dtype = next((v.dtype for v in params.values() if v.is_floating_point()), torch.get_default_dtype())
    dtypes = _attr_dtypes(xs, out_dtype)
    return _pack(tuple(torch.zeros(x_i.shape, dtype=d, device=x_i.device) for x_i, d in zip(xs, dtypes)), is_tuple)


def _common_dtype(dtypes: tuple[torch.dtype, ...]) -> torch.dtype:
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype


# ------------------------------------------------------------ discrete inputs, baselines


def _prepare(model_fn: Any, params: Any, x: Any, target: Any, check_finite: bool
             ) -> tuple[tuple[Tensor, ...], Any, bool, int, ResolvedTarget]:
    """:func:`~attrax.targets.prepare_call` with integer and boolean inputs allowed: the other families
    interpolate or differentiate x, perturbation methods only copy values around, so token ids and
    categorical codes are inputs too. A float model given integers (a ``uint8`` image) still gets
    ``check_dtypes``' message naming the conversion.

    The target is checked against the output of a one-row probe (``check_output``): most of these methods
    build every perturbed input before their first model call (Shapley sampling: ``n_samples * (K + 1)``
    copies of x with ``chunk_size=None``), so a bad target would otherwise fail only after that work.
    """
    return prepare_call(model_fn, params, x, target, check_finite=check_finite, check_output=True,
                        integer_inputs=True, boolean_inputs=True)


def _baselines(baseline: Baseline, xs: tuple[Tensor, ...], is_tuple: bool, groups: tuple[Tensor, ...] | None,
               n_groups: int, check_finite: bool, name: str = "baseline") -> tuple[Tensor, ...]:
    """Per-input baselines with the shape, dtype and device of each input.

    ``baseline`` is a number, a tensor broadcastable to ``x``, a tuple of those (one per input),
    a mapping ``{group id: value}`` (``groups`` not ``None``; unnamed groups take 0), or a
    callable ``baseline(x)`` returning one of these, called with ``x`` as the user passed it
    (never on an empty batch). For integer/boolean inputs the values must be exact values of
    that dtype (a pad or mask token id), checked when concrete.
    """
    if callable(baseline):
        if xs[0].shape[0] == 0:
            return tuple(torch.zeros_like(x_i) for x_i in xs)
        baseline = baseline(xs if is_tuple else xs[0])
        if callable(baseline):
            raise TypeError(f"{name}(x) must return a baseline (a number, a tensor or a tuple), got {_describe(baseline)}")
    if isinstance(baseline, Mapping):
        if groups is None:
            raise TypeError(f"{name} as a mapping {{group id: value}} needs feature groups; occlusion has none, "
                            f"pass a number or a tensor broadcastable to x")
        return _group_baselines(baseline, xs, groups, n_groups, check_finite, name)
    if isinstance(baseline, (tuple, list)):
        if len(baseline) != len(xs):
            raise ValueError(f"{name} has {len(baseline)} entries but x has {len(xs)} inputs")
        return tuple(_baseline_for(b, x_i, f"{name}[{i}]", check_finite) for i, (b, x_i) in enumerate(zip(baseline, xs)))
    return tuple(_baseline_for(baseline, x_i, name, check_finite) for x_i in xs)


def _baseline_for(b: Any, x: Tensor, label: str, check_finite: bool) -> Tensor:
    """One baseline as a tensor shaped like ``x``: cast for floating ``x``, exact for discrete ``x``."""
    if x.is_floating_point():
        return broadcast_baseline(b, x, label, check_finite)
    if b is None:
        return torch.zeros_like(x)
    if isinstance(b, Tensor):
        if b.is_complex():
            raise TypeError(f"{label} must be a real tensor, got dtype {b.dtype}")
        t = b
    elif isinstance(b, numbers.Real):
        try:
            t = torch.tensor(b, dtype=torch.bool if isinstance(b, bool) else
                             torch.int64 if isinstance(b, numbers.Integral) else torch.float64)
        except (OverflowError, RuntimeError):
            raise ValueError(f"{label} = {b} does not fit x's dtype {x.dtype}") from None
    else:
        raise TypeError(f"{label} must be a number, a Tensor broadcastable to x or a callable, got {_describe(b)}")
    try:
        shape = torch.broadcast_shapes(t.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"{label} of shape {tuple(t.shape)} does not broadcast to x of shape {tuple(x.shape)}")
    t = t.to(x.device)
    cast = t.to(x.dtype)
    if is_concrete(t) and not bool((cast.to(t.dtype) == t).all()):
        bad = t[cast.to(t.dtype) != t].reshape(-1)[0].item()
        raise ValueError(
            f"x has dtype {x.dtype} (token ids or categories: perturbation replaces values, never interpolates), so "
            f"{label} must hold values of that dtype, such as a pad or mask id; got {bad!r}"
        )
    return cast.expand_as(x)


def _group_baselines(mapping: Mapping[Any, Any], xs: tuple[Tensor, ...], groups: tuple[Tensor, ...], n_groups: int,
                     check_finite: bool, name: str) -> tuple[Tensor, ...]:
    """``{group id: value}`` -> per-input baselines; a value is a number or a ``()``/``(B,)`` tensor."""
    batch = xs[0].shape[0]
    for key, v in mapping.items():
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            raise TypeError(f"{name} keys must be feature group ids (ints), got {_describe(key)}")
        if not 0 <= key < n_groups:
            raise ValueError(f"{name} names group {key} but the feature groups are 0..{n_groups - 1}")
        if isinstance(v, Tensor) and tuple(v.shape) not in ((), (1,), (batch,)):
            raise ValueError(f"{name}[{key}] must be a number or a tensor of shape () or (B,) = ({batch},), "
                             f"got shape {tuple(v.shape)}")
    keys = sorted(int(k) for k in mapping)
    out = []
    for i, (g, x_i) in enumerate(zip(groups, xs)):
        proto = x_i.new_empty(batch)
        label = name if len(xs) == 1 else f"{name} (for x[{i}])"
        vals = [_baseline_for(mapping[k], proto, f"{label}[{k}]", check_finite) for k in keys]
        table = torch.zeros(batch, n_groups, dtype=x_i.dtype, device=x_i.device)
        if vals:
            table = table.index_copy(1, torch.tensor(keys, device=x_i.device), torch.stack(vals, 1))
        flat = g.expand(batch, *g.shape[1:]).reshape(batch, -1)
        out.append(table.gather(1, flat).reshape(x_i.shape))
    return tuple(out)


# ------------------------------------------------------------------------ occlusion


def _per_input(arg: Any, xs: tuple[Tensor, ...], name: str) -> list[tuple[int, ...]]:
    """Window/stride spec -> one tuple over the non-batch dims per input."""
    if len(xs) > 1 and isinstance(arg, tuple) and len(arg) == len(xs) and all(isinstance(a, (tuple, int)) for a in arg):
        specs = list(arg)
    else:
        specs = [arg] * len(xs)
    out = []
    for i, (spec, x) in enumerate(zip(specs, xs)):
        dims = x.ndim - 1
        if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
            spec = (int(spec),) * dims
        if not isinstance(spec, tuple) or len(spec) != dims or not all(isinstance(v, int) and v >= 1 for v in spec):
            raise ValueError(
                f"{name} must be a positive int or a tuple of {dims} positive ints (one per non-batch dim of "
                f"x{'' if len(xs) == 1 else f'[{i}]'} with shape {tuple(x.shape)}), got {spec!r}"
            )
        out.append(spec)
    return out


@forward_args
@_with_progress("Occlusion")
def occlusion(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    window: int | tuple[int, ...],
    stride: int | tuple[int, ...] | None = None,
    baseline: Baseline = 0.0,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> TensorOrTuple:
    r"""Occlusion [1]: slide a window of ``baseline`` values over the input and record the output drop.

    Windows start at multiples of ``stride`` along every non-batch dim, ``ceil((n - w) / s) + 1``
    of them per dim (the last one cropped at the border), as in Captum. Each feature gets the mean
    of :math:`f_t(x) - f_t(x_{\text{occluded}})` over the windows covering it.

    Args:
        window: Window shape over all non-batch dims (an int means that size in every dim).
        stride: Step over all non-batch dims; ``None`` means 1.
        baseline: Value written into the window: a number, a tensor broadcastable to ``x``, a tuple
            of those (tuple inputs) or a callable ``baseline(x)`` returning one. For integer or
            boolean ``x`` (token ids), a value of that dtype (e.g. the pad id).
        chunk_size: Windows per sample evaluated in one model call.
    Returns:
        Attributions with the shape and device of ``x``, and its dtype when floating; integer or
        boolean ``x`` gets the model output's dtype.
    References:
        [1] Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(4, 1, bias=False).eval())
        >>> x = torch.ones(1, 4)
        >>> torch.allclose(ax.occlusion(model_fn, params, x, None, window=1), x * params["weight"])
        True
    """
    xs, params, is_tuple, batch, t = _prepare(model_fn, params, x, target, check_finite)
    _check_common(chunk_size)
    windows = _per_input(window, xs, "window")
    strides = _per_input(1 if stride is None else stride, xs, "stride")
    for i, (x_i, w, s) in enumerate(zip(xs, windows, strides)):
        for n, wd, sd in zip(x_i.shape[1:], w, s):
            if wd > n:
                raise ValueError(f"window {w} is larger than x{'' if len(xs) == 1 else f'[{i}]'} of shape {tuple(x_i.shape)}")
            if sd > wd and n != wd:
                raise ValueError(f"stride {s} must not exceed window {w} (features would be skipped)")
    bs = _baselines(baseline, xs, is_tuple, None, 0, check_finite)
    if batch == 0:
        return _empty(xs, is_tuple, params)
    with eager_no_grad():
        full = _score(model_fn, params, xs, t)
        dtypes = _attr_dtypes(xs, full.dtype)
        attrs = []
        for i, (x_i, w, s, dt) in enumerate(zip(xs, windows, strides, dtypes)):
            dims = x_i.shape[1:]
            counts = [math.ceil((n - wd) / sd) + 1 for n, wd, sd in zip(dims, w, s)]
            n_windows = math.prod(counts)
            total = torch.zeros(x_i.shape, dtype=dt, device=x_i.device)
            cover = torch.zeros(dims, dtype=dt, device=x_i.device)

            def masks(lo: int, hi: int, dims: Any = dims, counts: Any = counts, w: Any = w, s: Any = s,
                      x_i: Tensor = x_i) -> Tensor:
                idx = torch.arange(lo, hi, device=x_i.device)
                m = torch.ones(hi - lo, *dims, dtype=torch.bool, device=x_i.device)
                for d in reversed(range(len(dims))):  # row-major window index
                    pos = idx % counts[d]
                    idx = idx // counts[d]
                    start = (pos * s[d]).reshape(-1, 1)
                    ar = torch.arange(dims[d], device=x_i.device).reshape(1, -1)
                    inside = (ar >= start) & (ar < start + w[d])
                    shape = [hi - lo] + [1] * len(dims)
                    shape[d + 1] = dims[d]
                    m = m & inside.reshape(shape)
                return m

            for lo, hi in chunks(n_windows, chunk_size):
                m = masks(lo, hi)

                def make(a: int, b: int, m: Tensor = m, i: int = i) -> tuple[Tensor, ...]:
                    mm = m.unsqueeze(1)
                    return tuple(
                        torch.where(mm, bs[j].unsqueeze(0), xs[j].unsqueeze(0)) if j == i else xs[j].unsqueeze(0).expand(b - a, *xs[j].shape)
                        for j in range(len(xs))
                    )

                drops = full.unsqueeze(0) - _evaluate(model_fn, params, t, hi - lo, None, make)  # (k, B)
                mf = m.to(dt)
                total = total + torch.einsum("kb,k...->b...", drops.to(dt), mf)
                cover = cover + mf.sum(0)
            attrs.append(total / cover.clamp(min=1))
    return _pack(tuple(attrs), is_tuple)


# ------------------------------------------------------------------- feature ablation


@forward_args
@_with_progress("Feature ablation")
def feature_ablation(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    feature_mask: TensorOrTuple | None = None,
    baseline: Baseline = 0.0,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> TensorOrTuple:
    r"""Feature ablation: replace each feature group by ``baseline`` and record the output drop.

    Every member of group :math:`g` gets :math:`f_t(x) - f_t(x_{g \leftarrow \text{baseline}})`.
    Groups may differ per sample (a ``feature_mask`` with batch dim ``B``).

    Args:
        feature_mask: Integer group ids broadcastable to ``x``; ``None``: every scalar alone.
        baseline: Replacement values: a number, a tensor broadcastable to ``x``, a tuple of those
            (tuple inputs), a mapping ``{group id: value}`` (value: a number or a ``(B,)`` tensor;
            unnamed groups take 0), or a callable ``baseline(x)`` returning any of these. For
            integer or boolean ``x`` (token ids), values of that dtype (e.g. the pad id).
        chunk_size: Groups per sample evaluated in one model call.
    Returns:
        Attributions with the shape and device of ``x``, and its dtype when floating; integer or
        boolean ``x`` gets the model output's dtype.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(4, 1, bias=False).eval())
        >>> x = torch.ones(1, 4)
        >>> a = ax.feature_ablation(model_fn, params, x, None, feature_mask=torch.tensor([[0, 0, 1, 1]]))
        >>> torch.allclose(a[0, 0], params["weight"][0, :2].sum())
        True
    """
    xs, params, is_tuple, batch, t = _prepare(model_fn, params, x, target, check_finite)
    _check_common(chunk_size)
    groups, n_groups = feature_groups(feature_mask, xs)
    bs = _baselines(baseline, xs, is_tuple, groups, n_groups, check_finite)
    if batch == 0:
        return _empty(xs, is_tuple, params)
    with eager_no_grad():

        def make(lo: int, hi: int) -> tuple[Tensor, ...]:
            member = _members(groups, torch.arange(lo, hi, device=xs[0].device))
            return tuple(torch.where(m, b.unsqueeze(0), x_i.unsqueeze(0)) for m, b, x_i in zip(member, bs, xs))

        drops = _drops(model_fn, params, t, xs, n_groups, chunk_size, make)  # (K, B)
        attrs = _spread(drops.T, groups, xs, _attr_dtypes(xs, drops.dtype))
    return _pack(attrs, is_tuple)


# ---------------------------------------------------------------- feature permutation


@forward_args
@_with_progress("Feature permutation")
def feature_permutation(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    feature_mask: TensorOrTuple | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> TensorOrTuple:
    r"""Permutation feature importance [1, 2]: shuffle each feature group across the batch.

    For every group :math:`g` one permutation :math:`\sigma_g` of the batch is drawn from
    ``generator`` (all of them before the first model call, never the identity, as in Captum's
    ``FeaturePermutation``). Sample :math:`i`'s members of :math:`g` get
    :math:`f_t(x)_i - f_t(x^{(g)})_i`, where :math:`x^{(g)}` is ``x`` with group :math:`g` of
    sample :math:`i` taken from sample :math:`\sigma_g(i)`. The ``K`` shuffled batches are
    evaluated as one batch of ``K * B`` rows, ``chunk_size`` groups at a time. The attribution
    of a sample depends on the rest of the batch by design.

    Deviation: Captum permutes each input of a tuple with its own draw; here a group that spans
    several inputs moves as one (one permutation per group).

    Args:
        feature_mask: Integer group ids broadcastable to ``x``, the same for every sample (batch
            dim 1); ``None``: every scalar alone.
        generator: Source of the permutations; ``None`` uses torch's default generator.
        chunk_size: Groups per sample evaluated in one model call (the result does not change).
    Returns:
        Attributions with the shape and device of ``x``, and its dtype when floating; integer or
        boolean ``x`` gets the model output's dtype.
    Raises:
        ValueError: If the batch holds a single sample, or ``feature_mask`` differs between samples.
    References:
        [1] Breiman. Random Forests. Machine Learning 45(1), 2001.
        [2] Fisher, Rudin, Dominici. All Models are Wrong, but Many are Useful. JMLR 20(177), 2019.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(3, 1, bias=False).eval())
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        >>> a = ax.feature_permutation(model_fn, params, x, None, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(a, (x - x.flip(0)) * params["weight"])  # two samples: the one shuffle swaps them
        True
    """
    xs, params, is_tuple, batch, t = _prepare(model_fn, params, x, target, check_finite)
    _check_common(chunk_size, generator)
    groups, k = feature_groups(feature_mask, xs)
    groups = _batch_shared(groups)
    if batch == 0:
        return _empty(xs, is_tuple, params)
    if batch == 1:
        raise ValueError("feature_permutation shuffles features across the batch, so x needs at least 2 samples, got 1")
    perm = _batch_permutations(k, batch, generator, xs[0].device)  # (K, B), every draw before any model call
    with eager_no_grad():
        full = _score(model_fn, params, xs, t)

        def make(lo: int, hi: int) -> tuple[Tensor, ...]:
            member = _members(groups, torch.arange(lo, hi, device=xs[0].device))  # (k, 1, ...)
            return tuple(torch.where(m, x_i[perm[lo:hi]], x_i.unsqueeze(0)) for m, x_i in zip(member, xs))

        drops = full.unsqueeze(0) - _evaluate(model_fn, params, t, k, chunk_size, make)  # (K, B)
        attrs = _spread(drops.T, groups, xs, _attr_dtypes(xs, full.dtype))
    return _pack(attrs, is_tuple)


def _batch_shared(groups: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Group ids with batch dim 1: a mask given per sample must be the same for every sample."""
    out = []
    for i, g in enumerate(groups):
        if g.shape[0] > 1:
            if is_concrete(g) and not bool((g == g[:1]).all()):
                label = "feature_mask" if len(groups) == 1 else f"feature_mask[{i}]"
                raise ValueError(f"feature_permutation moves a group between samples, so {label} must be the same "
                                 f"for every sample (batch dim 1), got different groups per sample")
            g = g[:1]
        out.append(g)
    return tuple(out)


def _batch_permutations(k: int, batch: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``(k, batch)`` permutations of ``range(batch)``, none the identity (``batch >= 2``).

    Row ``g`` is ``argsort`` of ``batch`` uniforms from ``generator``; identity rows are drawn again.
    """
    gdev = generator.device if generator is not None else device
    perm = torch.rand(k, batch, generator=generator, device=gdev).argsort(1)
    ident = torch.arange(batch, device=gdev)
    while True:
        same = (perm == ident).all(1)
        n = int(same.sum())
        if n == 0:
            return perm.to(device)
        perm[same] = torch.rand(n, batch, generator=generator, device=gdev).argsort(1)


# --------------------------------------------------------------------- shapley values


@forward_args
@_with_progress("Shapley sampling")
def shapley_sampling(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    feature_mask: TensorOrTuple | None = None,
    baseline: Baseline = 0.0,
    n_samples: int = 25,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    antithetic: bool = False,
    check_finite: bool = True,
) -> TensorOrTuple:
    r"""Shapley value sampling [1]: average marginal contributions over random feature orders.

    For each of ``n_samples`` permutations :math:`\pi` of the feature groups (shared by the
    batch, drawn with ``torch.randperm`` from ``generator`` before the first model call, as
    Captum's ``ShapleyValueSampling`` draws them), features are switched from ``baseline`` to
    ``x`` in the order :math:`\pi` and each is credited with the change of :math:`f_t` it causes.
    With ``antithetic=True`` every other permutation is the reverse of the previous one, which
    cancels the first-order sampling error. Exact for additive models whatever the draws.

    Args:
        feature_mask: Integer group ids broadcastable to ``x``; ``None``: every scalar alone.
        baseline: The "absent" value of a feature: a number, a tensor broadcastable to ``x``, a
            tuple of those, a mapping ``{group id: value}`` (unnamed groups take 0) or a callable
            ``baseline(x)`` returning one; for integer/boolean ``x`` a value of that dtype.
        n_samples: Permutations drawn.
        generator: Source of the draws; ``None`` uses torch's default generator.
        chunk_size: Model evaluations per sample in one call (the result does not change).
    Returns:
        Attributions with the shape and device of ``x``, and its dtype when floating; integer or
        boolean ``x`` gets the model output's dtype.

    References:
        [1] Castro, Gómez, Tejada. Polynomial calculation of the Shapley value based on sampling.
            Computers & Operations Research 36(5), 2009.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(3, 1, bias=False).eval())
        >>> x = torch.randn(2, 3)
        >>> a = ax.shapley_sampling(model_fn, params, x, None, n_samples=2, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(a, x * params["weight"], atol=1e-6)
        True
    """
    xs, params, is_tuple, batch, t = _prepare(model_fn, params, x, target, check_finite)
    _check_common(chunk_size, generator)
    check_positive_int(n_samples, "n_samples")
    groups, k = feature_groups(feature_mask, xs)
    bs = _baselines(baseline, xs, is_tuple, groups, k, check_finite)
    if batch == 0:
        return _empty(xs, is_tuple, params)
    device = generator.device if generator is not None else xs[0].device
    perms = []
    for s in range(n_samples):
        if antithetic and s % 2 == 1:
            perms.append(perms[-1].flip(0))
        else:
            perms.append(torch.randperm(k, generator=generator, device=device).to(xs[0].device))
    perm = torch.stack(perms)  # (n, K)
    with eager_no_grad():
        # rank[s, g] = position of group g in permutation s; prefix j holds the groups of rank < j
        rank = torch.empty_like(perm).scatter_(1, perm, torch.arange(k, device=perm.device).expand(n_samples, k))

        def make(lo: int, hi: int) -> tuple[Tensor, ...]:
            idx = torch.arange(lo, hi, device=perm.device)
            s, j = idx // (k + 1), idx % (k + 1)
            on = rank[s] < j.unsqueeze(1)  # (points, K): groups switched to x
            out = []
            for g, b, x_i in zip(groups, bs, xs):
                gf = g.expand(x_i.shape[0], *g.shape[1:]).reshape(-1)
                keep = on[:, gf].reshape(hi - lo, *x_i.shape)
                out.append(torch.where(keep, x_i.unsqueeze(0), b.unsqueeze(0)))
            return tuple(out)

        vals = _evaluate(model_fn, params, t, n_samples * (k + 1), chunk_size, make).reshape(n_samples, k + 1, batch)
        gains = vals[:, 1:] - vals[:, :-1]  # (n, K, B): gain of the j-th switched group
        credit = torch.zeros(n_samples, k, batch, dtype=gains.dtype, device=gains.device)
        credit.scatter_(1, perm.unsqueeze(2).expand(n_samples, k, batch), gains)
        phi = credit.mean(0)  # (K, B)
        attrs = _spread(phi.T, groups, xs, _attr_dtypes(xs, vals.dtype))
    return _pack(attrs, is_tuple)


#: exact Shapley values evaluate 2**M coalitions per sample: 4096 at this many groups
MAX_EXACT_GROUPS = 12


@forward_args
@_with_progress("Shapley values")
def shapley_values(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    feature_mask: TensorOrTuple | None = None,
    baseline: Baseline = 0.0,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> TensorOrTuple:
    r"""Exact Shapley values [1] of at most 12 feature groups, from all :math:`2^M` coalitions.

    With :math:`v(S) = f_t(h(S))`, :math:`h(S)` equal to ``x`` on the groups in :math:`S` and to
    ``baseline`` elsewhere, group :math:`g` of :math:`M` gets

    .. math:: \phi_g = \sum_{S \subseteq N \setminus \{g\}} \frac{|S|!\,(M-|S|-1)!}{M!}
              \big(v(S \cup \{g\}) - v(S)\big),

    computed as one matrix product of the coalition scores (float64 weights). The model is
    evaluated once per coalition, :math:`2^M` points per sample, ``chunk_size`` at a time;
    Captum's ``ShapleyValues`` walks all :math:`M!` orders instead (the same values). Efficiency
    holds to rounding: :math:`\sum_g \phi_g = f_t(x) - f_t(\text{baseline})`.

    Args:
        feature_mask: Integer group ids broadcastable to ``x`` (at most 12 groups); ``None``:
            every scalar alone (so ``x`` may hold at most 12 scalars per sample).
        baseline: The "absent" value of a feature: a number, a tensor broadcastable to ``x``, a
            tuple of those, a mapping ``{group id: value}`` (unnamed groups take 0) or a callable
            ``baseline(x)`` returning one; for integer/boolean ``x`` a value of that dtype.
        chunk_size: Coalitions per sample evaluated in one model call (the result does not change).
    Returns:
        Attributions with the shape and device of ``x``, and its dtype when floating; integer or
        boolean ``x`` gets the model output's dtype.
    Raises:
        ValueError: If there are more than 12 feature groups.
    References:
        [1] Shapley. A Value for n-Person Games. Contributions to the Theory of Games II, 1953.

    Example:
        >>> import torch, attrax as ax
        >>> f = lambda p, x: (x[:, :1] * x[:, 1:2]) + x[:, 2:]  # x0 x1 + x2
        >>> ax.shapley_values(f, {}, torch.tensor([[2.0, 3.0, 1.0]]), None)
        tensor([[3., 3., 1.]])
    """
    xs, params, is_tuple, batch, t = _prepare(model_fn, params, x, target, check_finite)
    _check_common(chunk_size)
    groups, k = feature_groups(feature_mask, xs)
    if k > MAX_EXACT_GROUPS:
        raise ValueError(
            f"shapley_values evaluates all 2**M coalitions and takes at most {MAX_EXACT_GROUPS} feature groups, got "
            f"{k}; group features with feature_mask, or estimate with shapley_sampling or kernel_shap"
        )
    bs = _baselines(baseline, xs, is_tuple, groups, k, check_finite)
    if batch == 0:
        return _empty(xs, is_tuple, params)
    bit = torch.arange(k, device=xs[0].device)
    z = (torch.arange(2**k, device=xs[0].device).unsqueeze(1) >> bit) & 1 == 1  # (2^M, M): coalition s holds bit g
    with eager_no_grad():
        y = _evaluate(model_fn, params, t, 2**k, chunk_size, _coalition_inputs(groups, xs, bs, z))  # (2^M, B)
        acc = torch.float64 if y.device.type != "mps" else torch.float32
        phi = _shapley_matrix(z, acc) @ y.to(acc)  # (M, B)
        attrs = _spread(phi.T, groups, xs, _attr_dtypes(xs, y.dtype))
    return _pack(attrs, is_tuple)


def _shapley_matrix(z: Tensor, dtype: torch.dtype) -> Tensor:
    r"""``C`` ``(M, 2^M)`` with :math:`\phi = C v`: :math:`C_{gS} = w(|S|-1)` if :math:`g \in S`, else :math:`-w(|S|)`,
    :math:`w(s) = s!\,(M-s-1)!/M!`."""
    m = z.shape[1]
    w = torch.tensor([math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m) for s in range(m)],
                     dtype=dtype, device=z.device)
    size = z.sum(1)  # (2^M,)
    inside = w[(size - 1).clamp(0, m - 1)]
    outside = -w[size.clamp(0, m - 1)]
    return torch.where(z.T, inside, outside)


# ---------------------------------------------------------------- surrogate models


def _coalition_inputs(groups: tuple[Tensor, ...], xs: tuple[Tensor, ...], bs: tuple[Tensor, ...], z: Tensor
                      ) -> Callable[[int, int], tuple[Tensor, ...]]:
    def make(lo: int, hi: int) -> tuple[Tensor, ...]:
        out = []
        for g, b, x_i in zip(groups, bs, xs):
            gf = g.expand(x_i.shape[0], *g.shape[1:]).reshape(-1)
            keep = z[lo:hi][:, gf].reshape(hi - lo, *x_i.shape)
            out.append(torch.where(keep, x_i.unsqueeze(0), b.unsqueeze(0)))
        return tuple(out)

    return make


def _weighted_ridge(z: Tensor, y: Tensor, w: Tensor, ridge: float) -> Tensor:
    """Per sample ``min sum_i w_i (y_i - c - z_i.phi)^2 + ridge |phi|^2`` (``c`` free); ``phi`` ``(B, K)``.

    Solved in float64 on the CPU without normal equations: centring by the weighted means removes
    ``c``, and the stacked system ``[sqrt(w) Zc; sqrt(ridge) I] phi = [sqrt(w) yc; 0]`` goes to
    LAPACK ``gelsd`` (deterministic; minimum-norm when rank-deficient).
    """
    k = z.shape[1]
    zf = z.cpu().to(torch.float64)
    yt = y.detach().cpu().to(torch.float64).T  # (B, n)
    w = w.detach().cpu().to(torch.float64)  # (B, n)
    wn = w / w.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    zc = zf.unsqueeze(0) - (wn @ zf).unsqueeze(1)  # (B, n, K)
    yc = yt - (wn * yt).sum(1, keepdim=True)  # (B, n)
    sw = w.sqrt()
    a = torch.cat([sw.unsqueeze(2) * zc, math.sqrt(ridge) * torch.eye(k, dtype=torch.float64).expand(w.shape[0], k, k)], 1)
    b = torch.cat([sw * yc, torch.zeros(w.shape[0], k, dtype=torch.float64)], 1)
    return torch.linalg.lstsq(a, b.unsqueeze(2), driver="gelsd").solution.squeeze(2)


@forward_args
@_with_progress("KernelSHAP")
def kernel_shap(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    feature_mask: TensorOrTuple | None = None,
    baseline: Baseline = 0.0,
    n_samples: int = 200,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> TensorOrTuple:
    r"""KernelSHAP [1]: Shapley values from a weighted linear fit over random coalitions.

    ``n_samples`` coalitions :math:`z \in \{0,1\}^M` of the :math:`M` feature groups are drawn
    from the Shapley kernel (size :math:`0 < s < M` with probability :math:`\propto (M-1)/(s(M-s))`,
    then a uniform subset), all before the first model call, so ``chunk_size`` does not change
    them. The model is evaluated on :math:`h(z)` (``x`` on the coalition, ``baseline`` elsewhere;
    :math:`f_t(0)` below is the score of the all-``baseline`` input) and on the
    empty and full coalitions, and

    .. math:: \min_\phi \sum_i \big(f_t(h(z_i)) - f_t(0) - z_i\cdot\phi\big)^2
              \quad\text{s.t.}\quad \sum_j \phi_j = f_t(x) - f_t(0)

    is solved per sample: the empty and full coalitions are exact constraints (the infinite
    kernel weight of [1], eq. 8, which Captum approximates with weight :math:`10^6` and a free
    intercept). The constraint is eliminated with an orthonormal basis of
    :math:`\{v : \sum_j v_j = 0\}` and the remaining least-squares problem is solved in float64
    on the CPU by LAPACK ``gelsd`` (SVD: minimum-norm when fewer than :math:`M-1` independent
    coalitions were drawn, and bit-identical from call to call for a generator seeded alike).
    A model linear in the coalition indicators (e.g. :math:`w\cdot x + b`) is fitted exactly as
    soon as the draws determine :math:`\phi` (:math:`M-1` of them independent modulo the
    constraint); with fewer, the constraint still holds exactly.

    Args:
        feature_mask: Integer group ids broadcastable to ``x``; ``None``: every scalar alone.
        baseline: The "absent" value of a feature: a number, a tensor broadcastable to ``x``, a
            tuple of those, a mapping ``{group id: value}`` (unnamed groups take 0) or a callable
            ``baseline(x)`` returning one; for integer/boolean ``x`` a value of that dtype.
        n_samples: Coalitions drawn (besides the empty and full ones).
        generator: Source of the draws; ``None`` uses torch's default generator.
        chunk_size: Coalitions per sample evaluated in one model call (the result does not change).
    Returns:
        Attributions with the shape and device of ``x`` (empty for an empty batch), and its dtype
        when floating; integer or boolean ``x`` gets the model output's dtype.

    References:
        [1] Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(4, 1).eval())
        >>> x = torch.randn(2, 4)
        >>> a = ax.kernel_shap(model_fn, params, x, None, n_samples=64, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(a, x * params["weight"], atol=1e-4)
        True
    """
    xs, params, is_tuple, batch, t = _prepare(model_fn, params, x, target, check_finite)
    _check_common(chunk_size, generator)
    check_positive_int(n_samples, "n_samples")
    groups, k = feature_groups(feature_mask, xs)
    bs = _baselines(baseline, xs, is_tuple, groups, k, check_finite)
    if batch == 0:
        return _empty(xs, is_tuple, params)
    z = _shapley_coalitions(k, n_samples, generator).to(xs[0].device)  # every draw before any model call
    ends = torch.stack([torch.zeros(k, dtype=torch.bool, device=z.device), torch.ones(k, dtype=torch.bool, device=z.device)])
    z = torch.cat([z, ends])
    with eager_no_grad():
        y = _evaluate(model_fn, params, t, z.shape[0], chunk_size, _coalition_inputs(groups, xs, bs, z))  # (n + 2, B)
        phi = _constrained_shapley_fit(z[:-2], y[:-2], y[-2], y[-1])  # (B, K) float64 on the CPU
        dtypes = _attr_dtypes(xs, y.dtype)
        attrs = _spread(phi.to(dtype=_common_dtype(dtypes)).to(xs[0].device), groups, xs, dtypes)
    return _pack(attrs, is_tuple)


def _constrained_shapley_fit(z: Tensor, y: Tensor, empty: Tensor, full: Tensor) -> Tensor:
    r"""Per sample :math:`\min_\phi |y - e - Z\phi|^2` s.t. :math:`1\cdot\phi = f - e`, in float64.

    ``z``: ``(n, M)`` coalitions, ``y``: ``(n, B)`` their scores, ``empty``/``full``: ``(B,)`` the
    scores :math:`e` and :math:`f` of the empty and full coalitions; returns ``(B, M)`` on the CPU.
    With :math:`\delta = f - e`, :math:`\phi = \frac{\delta}{M}1 + Qu` where the columns of
    :math:`Q` (the columns 2..M of the Householder reflection :math:`H` that swaps :math:`e_1` and
    :math:`1/\sqrt M`) are an orthonormal basis of :math:`1^\perp`, so :math:`Z Q` is no worse
    conditioned than :math:`Z` and :math:`u` is the minimum-norm solution of
    :math:`ZQu = y - e - \frac{\delta}{M} Z 1` (LAPACK ``gelsd``, deterministic). One
    factorisation serves the whole batch (the draws are shared).
    """
    f64 = torch.float64
    n, m = z.shape
    y, empty, full = (v.detach().cpu().to(f64) for v in (y, empty, full))
    base = (full - empty) / max(m, 1)  # (B,)
    if m <= 1 or n == 0:
        return base.unsqueeze(1).expand(-1, m).clone()
    zf = z.cpu().to(f64)
    v = torch.full((m,), -1 / math.sqrt(m), dtype=f64)
    v[0] += 1
    scale = 2 / (v @ v)
    design = (zf - scale * (zf @ v).unsqueeze(1) * v)[:, 1:]  # Z H without its first column: Z Q, (n, M-1)
    rhs = y - empty - base * zf.sum(1, keepdim=True)  # (n, B)
    u = torch.linalg.lstsq(design, rhs, driver="gelsd").solution  # (M-1, B)
    qu = torch.cat([torch.zeros(1, u.shape[1], dtype=f64), u]) - scale * v.unsqueeze(1) * (v[1:] @ u)  # H [0; u]
    return (qu + base).T


def _shapley_coalitions(k: int, n: int, generator: torch.Generator | None) -> Tensor:
    """``(n, k)`` coalitions of size ``0 < s < k`` from the Shapley kernel (none when ``k <= 1``)."""
    if k <= 1:
        return torch.zeros(0, k, dtype=torch.bool)
    sizes = torch.arange(1, k, dtype=torch.float64)
    p = (k - 1) / (sizes * (k - sizes))
    device = generator.device if generator is not None else torch.device("cpu")
    size = torch.multinomial((p / p.sum()).to(device), n, replacement=True, generator=generator).cpu() + 1
    keys = torch.rand(n, k, generator=generator, device=device).cpu()
    order = keys.argsort(1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(k).expand(n, k))
    return ranks < size.unsqueeze(1)


@forward_args
@_with_progress("LIME")
def lime(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    feature_mask: TensorOrTuple | None = None,
    baseline: Baseline = 0.0,
    n_samples: int = 200,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    distance: str = "cosine",
    kernel_width: float = 1.0,
    regularization: str = "lasso",
    alpha: float = 0.01,
    check_finite: bool = True,
) -> TensorOrTuple:
    r"""LIME [1]: a sparse local linear surrogate fitted on random on/off feature patterns.

    Coalitions :math:`z \sim \text{Bernoulli}(1/2)^M` switch groups between ``x`` and ``baseline``,
    all drawn before the first model call (``chunk_size`` does not change them); samples are
    weighted by the exponential kernel :math:`\exp(-d^2/w^2)`, :math:`w` = ``kernel_width``, of the
    ``cosine`` (default, as Captum) or ``euclidean`` distance :math:`d` between the perturbed and
    the original input (for integer/boolean inputs, whose values are codes, between the
    indicator of the positions left unchanged and all ones, as the ``lime`` package does for
    text), and :math:`f_t \approx c + z\cdot\phi` is fitted with ``lasso``
    (weighted, by proximal gradient in the model output's dtype, penalty ``alpha``: Captum's
    default surrogate) or ``ridge`` (penalty ``alpha``, solved in float64).

    Deviation: Captum's default similarity (like the ``lime`` package) is
    :math:`\exp(-d^2/(2w^2))`, a kernel :math:`\sqrt2` times wider at the same ``kernel_width``;
    pass ``kernel_width=math.sqrt(2) * w`` to weight samples as Captum does with width ``w``.

    Args:
        feature_mask: Integer group ids broadcastable to ``x``; ``None``: every scalar alone.
        baseline: The "off" value of a feature: a number, a tensor broadcastable to ``x``, a tuple
            of those, a mapping ``{group id: value}`` (unnamed groups take 0) or a callable
            ``baseline(x)`` returning one; for integer/boolean ``x`` a value of that dtype.
        n_samples: Coalitions drawn.
        generator: Source of the draws; ``None`` uses torch's default generator.
        chunk_size: Coalitions per sample evaluated in one model call (the result does not change).
    Returns:
        Attributions with the shape and device of ``x``, and its dtype when floating; integer or
        boolean ``x`` gets the model output's dtype.

    References:
        [1] Ribeiro, Singh, Guestrin. "Why Should I Trust You?" KDD 2016.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(4, 1).eval())
        >>> x = torch.randn(1, 4)
        >>> a = ax.lime(model_fn, params, x, None, n_samples=256, regularization="ridge", alpha=1e-6,
        ...             generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(a, x * params["weight"], atol=1e-3)
        True
    """
    xs, params, is_tuple, batch, t = _prepare(model_fn, params, x, target, check_finite)
    _check_common(chunk_size, generator)
    check_positive_int(n_samples, "n_samples")
    if distance not in ("cosine", "euclidean"):
        raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")
    if regularization not in ("lasso", "ridge"):
        raise ValueError(f"regularization must be 'lasso' or 'ridge', got {regularization!r}")
    if not (isinstance(kernel_width, numbers.Real) and kernel_width > 0):
        raise ValueError(f"kernel_width must be > 0, got {kernel_width!r}")
    if not (isinstance(alpha, numbers.Real) and alpha >= 0):
        raise ValueError(f"alpha must be >= 0, got {_describe(alpha)}")
    groups, k = feature_groups(feature_mask, xs)
    bs = _baselines(baseline, xs, is_tuple, groups, k, check_finite)
    if batch == 0:
        return _empty(xs, is_tuple, params)
    device = generator.device if generator is not None else xs[0].device
    z = (torch.rand(n_samples, k, generator=generator, device=device) < 0.5).to(xs[0].device)
    make = _coalition_inputs(groups, xs, bs, z)
    with eager_no_grad():
        y = _evaluate(model_fn, params, t, n_samples, chunk_size, make)  # (n, B)
        dtypes = _attr_dtypes(xs, y.dtype)
        dist = _distances(make, xs, n_samples, chunk_size, distance, _common_dtype(dtypes))  # (n, B)
        w = torch.exp(-(dist**2) / kernel_width**2).T  # (B, n)
        if regularization == "ridge":
            phi = _weighted_ridge(z, y, w, float(alpha)).to(dtype=y.dtype, device=y.device)
        else:
            phi = _weighted_lasso(z.to(y.dtype), y, w, float(alpha))
        attrs = _spread(phi, groups, xs, dtypes)
    return _pack(attrs, is_tuple)


def _distances(make: Callable[[int, int], tuple[Tensor, ...]], xs: tuple[Tensor, ...], n: int, chunk_size: int | None,
               mode: str, dtype: torch.dtype) -> Tensor:
    """``(n, B)`` distances of the perturbed inputs to ``x``; discrete inputs as kept-position indicators."""
    ref = torch.cat([(x if x.is_floating_point() else torch.ones_like(x)).reshape(x.shape[0], -1).to(dtype)
                     for x in xs], 1)
    out = []
    for lo, hi in chunks(n, chunk_size):
        pts = torch.cat([(p if x.is_floating_point() else p == x.unsqueeze(0)).reshape(p.shape[0], p.shape[1], -1).to(dtype)
                         for p, x in zip(make(lo, hi), xs)], 2)  # (k, B, D)
        if mode == "cosine":
            out.append(1 - torch.nn.functional.cosine_similarity(pts, ref.unsqueeze(0), dim=2, eps=1e-8))
        else:
            out.append((pts - ref.unsqueeze(0)).norm(dim=2))
    return torch.cat(out)


def _weighted_lasso(z: Tensor, y: Tensor, w: Tensor, alpha: float, iters: int = 500) -> Tensor:
    r"""Per sample ``min 1/(2 sum w) sum_i w_i (y_i - c - z_i.phi)^2 + alpha |phi|_1`` by FISTA."""
    n, k = z.shape
    wn = w / w.sum(1, keepdim=True)  # (B, n)
    yt = y.T  # (B, n)
    # centre by the weighted means so the intercept drops out
    zm = wn @ z  # (B, K)
    ym = (wn * yt).sum(1, keepdim=True)
    zc = z.unsqueeze(0) - zm.unsqueeze(1)  # (B, n, K)
    yc = yt - ym
    gram = zc.transpose(1, 2) @ (wn.unsqueeze(2) * zc)  # (B, K, K)
    lin = (zc.transpose(1, 2) @ (wn * yc).unsqueeze(2)).squeeze(2)  # (B, K)
    step = 1.0 / torch.linalg.matrix_norm(gram, ord=2).clamp(min=1e-12).unsqueeze(1)
    phi = torch.zeros_like(lin)
    momentum, prev, tk = phi, phi, 1.0
    for _ in range(iters):
        grad = (gram @ momentum.unsqueeze(2)).squeeze(2) - lin
        new = momentum - step * grad
        new = new.sign() * (new.abs() - step * alpha).clamp(min=0)
        tn = (1 + math.sqrt(1 + 4 * tk * tk)) / 2
        momentum = new + ((tk - 1) / tn) * (new - prev)
        prev, tk = new, tn
    return prev
