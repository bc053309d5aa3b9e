"""Target resolution: which scalar per sample is explained (API.md section 2).

``check_target`` runs at the public boundary, before any transform, with what
can be known without running the model (types, lengths). ``prepare_call`` then
validates the target against the output shape the user's call produces, found
by evaluating the model on one row of ``x`` (so a bad target is rejected before
a method evaluates many points per sample). ``select`` runs on the model output
inside the differentiated function and checks everything that needs the output
shape, before the backward pass; value checks (index ranges) are skipped when
the target is symbolic (under ``vmap`` over targets or ``torch.compile``), where
they cannot be made. Every message names the output shape of the user's call,
``(B, ...)`` with the user's batch, never a batch of folded steps or samples.

One indexing rule for every spelling (int, sequence, tensor): Python's,
``-C <= t < C`` for ``C`` classes, negative values counting from the end.

Three spellings are resolved as selection callables (``kind="callable"``), so every method,
rule methods' seeds included, handles them without a case of its own: a list of index tuples
(one per sample, :class:`PerSampleIndex`), ``"sum"`` (:class:`SumOutputs`, the sum over all
outputs, only when asked) and, internally, neuron selectors. ``repeat_target`` tiles a
:class:`PerSampleIndex` for folded copies like a per-sample tensor.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .core import _describe, inside_transform, is_concrete, keeps_graph

__all__ = ["PerSampleIndex", "ResolvedTarget", "SumOutputs", "check_target", "prepare_call", "repeat_target", "select"]


class PerSampleIndex:
    """Selects ``out[i, *index[i]]``: one index tuple into the non-batch dims per sample.

    ``index`` is a ``(B, k)`` LongTensor (Python indexing, negative values count from the end).
    Resolved from a target given as a list of tuples; a callable so that every method handles it.
    """

    def __init__(self, index: Tensor) -> None:
        self.index = index

    def __call__(self, out: Tensor) -> Tensor:
        idx = self.index.to(out.device)
        if out.shape[0] != idx.shape[0]:
            raise ValueError(f"target has {idx.shape[0]} index tuples but the output of shape {tuple(out.shape)} has "
                             f"{out.shape[0]} rows")
        rows = torch.arange(out.shape[0], device=out.device)
        return out[(rows, *idx.unbind(1))]

    def repeat(self, times: int) -> PerSampleIndex:
        """The selector for ``times`` stacked copies of the batch."""
        return PerSampleIndex(self.index.repeat(times, 1))

    def subset(self, rows: Tensor) -> PerSampleIndex:
        return PerSampleIndex(self.index[rows.to(self.index.device)])

    def check(self, dims: tuple[int, ...], shape: Callable[[], tuple[int, ...]], values: bool) -> None:
        """Raise naming ``target`` and the output shape if the tuples do not index ``dims``."""
        k = self.index.shape[1]
        if k != len(dims):
            raise ValueError(f"target index tuples have {k} indices but the output of shape {shape()} has "
                             f"{len(dims)} non-batch dims")
        if values and is_concrete(self.index):
            for j, n in enumerate(dims):
                col = self.index[:, j]
                if bool(((col < -n) | (col >= n)).any()):
                    i = int(((col < -n) | (col >= n)).nonzero()[0, 0])
                    raise ValueError(f"target index tuple {tuple(self.index[i].tolist())} of sample {i} is out of "
                                     f"range at position {j} for output of shape {shape()} (expected {-n} <= index < {n})")

    def __repr__(self) -> str:
        return f"PerSampleIndex({self.index.tolist()})"


class SumOutputs:
    """Selects the sum of all outputs of each sample (``target="sum"``): never implied, only when asked."""

    def __call__(self, out: Tensor) -> Tensor:
        return out.reshape(out.shape[0], -1).sum(1)

    def __repr__(self) -> str:
        return 'SumOutputs("sum")'


@dataclass(frozen=True)
class ResolvedTarget:
    """A validated target.

    ``kind`` is one of ``"none"``, ``"int"``, ``"index"`` (tuple into non-batch
    dims), ``"tensor"`` (a long tensor: 0-d for one class for all samples, or
    ``(B,)`` per sample) and ``"callable"``. ``batch`` is the batch size of the
    user's call (error messages speak of its output, also when a method folds
    steps or samples into the batch); ``checked`` records that the target was
    validated against that output's shape, so per-call value checks (a device sync
    for tensor targets) can be skipped.
    """

    kind: str
    value: Any
    batch: int | None = None
    checked: bool = False


def check_target(target: Any, batch_size: int, out_shape: tuple[int, ...] | None = None) -> ResolvedTarget:
    """Validate ``target`` as far as possible without the model output.

    With ``out_shape`` (the shape of the output the user's call produces) error
    messages name it, and the target is also checked against it (all kinds but
    callables, which need the output itself).
    """
    note = "" if out_shape is None else f" (output shape {tuple(out_shape)})"
    if target is None:
        resolved = ResolvedTarget("none", None, batch_size)
    elif isinstance(target, bool):
        raise TypeError(
            f"target must be an int, a sequence of ints, a tuple, a callable or None, got bool {target}{note}"
        )
    elif isinstance(target, str):
        if target != "sum":
            raise TypeError(f'target must be an int, a sequence of ints, a tuple, a callable, "sum" or None, got '
                            f"str {target!r}{note}")
        resolved = ResolvedTarget("callable", SumOutputs(), batch_size)
    elif isinstance(target, numbers.Integral):
        resolved = ResolvedTarget("int", int(target), batch_size)
    elif isinstance(target, tuple):
        if not target or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target):
            raise TypeError(f"target tuple must hold ints indexing the non-batch dims, got {target!r}{note}")
        resolved = ResolvedTarget("index", tuple(int(t) for t in target), batch_size)
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target tensor must hold integers (a LongTensor of class indices), got dtype {target.dtype}{note}"
            )
        if target.ndim > 1:
            raise ValueError(f"target tensor must be 0-d or of shape (B,) = ({batch_size},), got shape "
                             f"{tuple(target.shape)}{note}")
        if target.ndim == 1 and target.shape[0] == 1 and batch_size != 1:
            target = target.reshape(())  # one class for every sample, as Captum
        if target.ndim == 1 and target.shape[0] != batch_size:
            raise ValueError(f"target has {target.shape[0]} entries but the batch has {batch_size} samples{note}")
        resolved = ResolvedTarget("tensor", target.long(), batch_size)
    elif isinstance(target, list) and target and all(isinstance(t, tuple) for t in target):
        resolved = ResolvedTarget("callable", _per_sample_index(target, batch_size, note), batch_size)
    elif isinstance(target, np.ndarray) or (isinstance(target, Sequence) and not isinstance(target, str)):
        try:
            arr = np.asarray(target)
        except ValueError:  # ragged: ints mixed with tuples (found in review)
            arr = np.asarray([], dtype=float)
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise TypeError(f"target sequence must be a flat sequence of ints, got {target!r}{note}")
        if arr.shape[0] != batch_size:
            raise ValueError(f"target has {arr.shape[0]} entries but the batch has {batch_size} samples{note}")
        resolved = ResolvedTarget("tensor", torch.as_tensor(arr, dtype=torch.long), batch_size)
    elif callable(target):
        resolved = ResolvedTarget("callable", target, batch_size)
    else:
        raise TypeError(
            f"target must be an int, a sequence of ints, a LongTensor, a tuple of ints, a callable or None, "
            f"got {_describe(target)}{note}"
        )
    if out_shape is not None and (resolved.kind != "callable" or isinstance(resolved.value, PerSampleIndex)):
        _check_against(resolved, tuple(out_shape)[1:], lambda: tuple(out_shape), values=True)
        resolved = replace(resolved, checked=True)
    return resolved


def _per_sample_index(target: Sequence[tuple[Any, ...]], batch_size: int, note: str) -> PerSampleIndex:
    """A list of index tuples, one per sample, as a :class:`PerSampleIndex`."""
    if len(target) != batch_size:
        raise ValueError(f"target has {len(target)} index tuples but the batch has {batch_size} samples{note}")
    lengths = {len(t) for t in target}
    ok = all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for t in target for i in t)
    if len(lengths) != 1 or 0 in lengths or not ok:
        raise TypeError(f"a per-sample target must be a list of index tuples of ints, all of one length (one per "
                        f"sample, indexing the non-batch dims), got {list(target)!r}{note}")
    return PerSampleIndex(torch.tensor([tuple(int(i) for i in t) for t in target], dtype=torch.long))


def select(out: Tensor, target: ResolvedTarget) -> Tensor:
    """One scalar per sample, shape ``(B,)``, chosen by ``target`` from ``out``.

    ``out`` may hold several stacked copies of the user's batch (steps, samples,
    perturbations); errors still name the output shape of the user's call.
    """
    check_selects(out, target)
    batch = out.shape[0]
    kind, t = target.kind, target.value
    if kind == "none":
        return out.reshape(batch)
    if kind == "int":
        return out[:, t]
    if kind == "index":
        return out[(slice(None),) + t]
    if kind == "tensor":
        idx = t.to(out.device)
        idx = torch.where(idx < 0, idx + out.shape[1], idx)  # Python indexing: -1 is the last class
        return out.gather(1, idx.expand(batch).unsqueeze(1)).squeeze(1)
    fn: Callable[[Tensor], Tensor] = t
    value = fn(out)
    _check_callable_value(value, batch, lambda: _user_shape(out, target))
    return value


def check_selects(out: Tensor, target: ResolvedTarget) -> None:
    """The checks of :func:`select` that need no selection: ``out`` is a batched tensor and ``target`` fits
    its shape (a callable target is checked when called)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"model_fn must return a Tensor of shape (B, ...), got {_describe(out)}")
    if out.ndim == 0:
        raise ValueError("model_fn returned a 0-d tensor; the output must have a batch dimension (B, ...)")
    batch = out.shape[0]
    shape = lambda: _user_shape(out, target)  # noqa: E731 - only built for an error message
    _check_against(target, tuple(out.shape[1:]), shape, values=not target.checked)
    if target.kind == "tensor":
        idx = target.value
        if idx.ndim == 1 and idx.shape[0] != batch:
            raise ValueError(f"target has {idx.shape[0]} entries but the output of shape {tuple(out.shape)} has {batch} rows")


def _check_callable_value(value: Any, rows: int, shape: Callable[[], tuple[int, ...]]) -> None:
    """A callable target's value on an output of ``rows`` rows must have shape ``(rows,)``."""
    if isinstance(value, Tensor) and tuple(value.shape) == (rows,):
        return
    user = shape()
    got: Any = type(value).__name__
    if isinstance(value, Tensor):
        got = tuple(value.shape)
        if got and got[0] == rows:
            got = (user[0], *got[1:])
        elif rows != user[0]:  # the method called it on other rows than the user's batch: a probe of the first
            # rows, or steps/samples folded into the batch, which a fixed-size tensor the target closes over cannot follow
            why = (f"{rows // user[0]} copies of the batch of {user[0]}: steps or samples folded into the batch"
                   if rows > user[0] > 0 and rows % user[0] == 0 else f"the first {rows} of the batch of {user[0]}")
            raise ValueError(
                f"a callable target must return one scalar per row of the output it is given; this method gives it "
                f"{rows} rows ({why}), so shape ({rows},), and it returned {got}. A target that closes over a "
                f"tensor with one entry per sample cannot follow that: pass those indices as the target itself (a "
                f"tensor of shape ({user[0]},)), or compute them from the output it is given"
            )
    hint = ("; a target that closes over a tensor with one entry per sample cannot follow a method that folds steps "
            "or samples into the batch (noise_tunnel): pass those indices as the target itself, or compute them from "
            "the output it is given") if isinstance(got, tuple) and len(got) == 1 else ""
    raise ValueError(
        f"a callable target must return one scalar per sample, shape ({user[0]},); got {got} for output "
        f"of shape {user}{hint}"
    )


def _user_shape(out: Tensor, target: ResolvedTarget) -> tuple[int, ...]:
    """The shape of ``out`` as the user's call produces it: stacked copies of the batch folded back."""
    shape = tuple(int(n) for n in out.shape)
    b = target.batch
    if b is not None and b > 0 and shape[0] != b and shape[0] % b == 0:
        return (int(b), *shape[1:])
    return shape


def _check_against(
    target: ResolvedTarget, dims: tuple[int, ...], shape: Callable[[], tuple[int, ...]], *, values: bool
) -> None:
    """Check ``target`` against an output with non-batch dims ``dims``; ``shape()`` names it in errors.

    ``values``: also check the entries of a tensor target (when concrete; a device sync).
    """
    kind, t = target.kind, target.value
    if kind == "none":
        if not (len(dims) == 0 or dims == (1,)):
            raise ValueError(
                f"target is None but the output has shape {shape()}; None is allowed only for outputs of "
                f"shape (B,) or (B, 1): pass a class index, a per-sample sequence, a tuple index, a callable, or "
                f'"sum" for the sum of all outputs'
            )
    elif kind == "int":
        _need_2d(dims, shape, "an int")
        n = dims[0]
        if not -n <= t < n:
            raise ValueError(f"target {t} is out of range for output of shape {shape()} (expected {-n} <= target < {n})")
    elif kind == "index":
        if len(t) != len(dims):
            raise ValueError(
                f"target tuple {t} has {len(t)} indices but the output of shape {shape()} has "
                f"{len(dims)} non-batch dims"
            )
        for i, (idx, n) in enumerate(zip(t, dims)):
            if not -n <= idx < n:
                raise ValueError(
                    f"target tuple {t} is out of range at position {i} for output of shape {shape()} "
                    f"(expected {-n} <= index < {n})"
                )
    elif kind == "callable" and isinstance(t, PerSampleIndex):
        t.check(dims, shape, values)
    elif kind == "tensor":
        _need_2d(dims, shape, "a tensor")
        n = dims[0]
        if values and is_concrete(t) and t.numel() and _out_of_range(t, n):
            raise ValueError(
                f"target values must lie in [{-n}, {n}) for output of shape {shape()}, got "
                f"min {int(t.min())} and max {int(t.max())}"
            )


def _out_of_range(t: Tensor, n: int) -> bool:
    """Some entry of the index tensor ``t`` lies outside ``[-n, n)`` (a short CPU tensor: read as Python ints,
    one op instead of four)."""
    if t.device.type == "cpu" and t.numel() <= 4096 and not t.is_floating_point() and not torch.compiler.is_compiling():
        return any(v < -n or v >= n for v in t.reshape(-1).tolist())
    return bool(((t < -n) | (t >= n)).any())


def repeat_target(target: ResolvedTarget, times: int) -> ResolvedTarget:
    """The target for a batch made of ``times`` stacked copies of the original batch."""
    if target.kind == "tensor" and target.value.ndim == 1:
        return replace(target, value=target.value.repeat(times))
    if isinstance(target.value, PerSampleIndex):
        return replace(target, value=target.value.repeat(times))
    return target


def _need_2d(dims: tuple[int, ...], shape: Callable[[], tuple[int, ...]], what: str) -> None:
    if len(dims) != 1:
        raise ValueError(
            f"target is {what}, which selects out[:, t], but the output has shape {shape()}; "
            f"use a tuple index (one int per non-batch dim) or a callable"
        )


def prepare_call(
    model_fn: Any,
    params: Any,
    x: Any,
    target: Any,
    *,
    check_finite: bool = True,
    detach: bool = True,
    check_output: bool = False,
    integer_inputs: bool = False,
    boolean_inputs: bool = False,
    check_ids: bool = True,
) -> tuple[tuple[Tensor, ...], Any, bool, int, ResolvedTarget]:
    """The boundary checks every method starts with.

    With ``integer_inputs`` (layer methods, whose paths run between layer values) inputs may be
    integer tensors, e.g. token ids, and with ``boolean_inputs`` also boolean ones (perturbation
    methods, which only copy values around); floating point inputs are checked as usual.

    Checks ``model_fn``, ``params`` (keys, dtypes), ``x`` and ``target``. Methods
    whose first model call evaluates many points per sample (steps, samples,
    baselines, perturbations folded into the batch) pass ``check_output=True``: the
    target is then validated against the output shape of the user's call before
    returning, so a bad target fails before the heavy work. The model runs once on
    the first row of ``x`` under ``torch.no_grad`` (1/B of a forward; measured far
    cheaper than fake-tensor shape inference, see ``_Probe``). Methods that
    evaluate the model at ``x`` first need no probe: ``select`` checks the target
    there, before any backward pass, and names the user's output shape even when
    it sees folded copies. (Not the default: callers also pass a placeholder
    target, e.g. ``None`` just to check ``x``.)

    Inference tensors (made under ``torch.inference_mode``) in ``x`` and ``params``
    are replaced by normal copies, so gradient methods can record them.

    Returns ``(inputs, params, x_was_tuple, batch_size, resolved_target)``; inputs
    and params are detached from regular autograd when no ``torch.func``
    transform is active (see ``core.detach_outside_transforms``).
    """
    from .core import (
        as_tuple,
        check_dtypes,
        check_inputs,
        check_embedding_ids,
        check_model,
        detach_outside_transforms,
        warn_training,
        without_inference_tensors,
    )

    check_model(model_fn, params)
    warn_training(model_fn)
    xs, is_tuple = as_tuple(x)
    if integer_inputs or boolean_inputs:
        batch = _check_integer_inputs(xs, check_finite, allow_bool=boolean_inputs)
    else:
        batch = check_inputs(xs, check_finite=check_finite)
    params, xs = without_inference_tensors(params, xs)
    probe = _Probe(model_fn, params, xs)
    if check_ids:  # (off where the caller binds the real ids later: ax.export)
        check_embedding_ids(model_fn, params, xs)
    mismatch = check_dtypes(params, xs)
    if mismatch is not None:
        probe.check_dtypes(mismatch)
    try:
        resolved = check_target(target, batch)
    except (TypeError, ValueError):
        shape = probe.shape(batch)
        if shape is None:
            raise
        check_target(target, batch, shape)  # raises the same error, now naming the output shape
        raise
    if check_output:
        resolved = probe.check(resolved)
    if detach:
        params, xs = detach_outside_transforms(params, xs)
    return xs, params, is_tuple, batch, resolved


def _check_integer_inputs(xs: tuple[Tensor, ...], check_finite: bool, allow_bool: bool = False) -> int:
    """``check_inputs`` that also admits integer tensors (token ids), and boolean ones with ``allow_bool``;
    returns the batch size."""
    from .core import check_finite_tensor

    for i, t in enumerate(xs):
        label = "x" if len(xs) == 1 else f"x[{i}]"
        if t.is_complex() or (t.dtype == torch.bool and not allow_bool):
            kinds = "a real tensor (floating, integer or boolean)" if allow_bool else "a floating point or integer tensor"
            raise TypeError(f"{label} must be {kinds}, got dtype {t.dtype}")
        if t.ndim < 1:
            raise ValueError(f"{label} must have a batch dimension, got a 0-d tensor")
        if t.shape[0] != xs[0].shape[0]:
            raise ValueError(f"all inputs must share the batch size: {label} has {t.shape[0]}, expected {xs[0].shape[0]}")
        if check_finite and t.is_floating_point():
            check_finite_tensor(t, label)
    return xs[0].shape[0]


class _Probe:
    """The model evaluated on the first row of ``x`` without autograd: the output shape of the user's call.

    Run at most once, and only where tensor values are concrete (not inside
    ``torch.func`` transforms, ``torch.compile`` or export tracing) and not inside
    ``value_and_attribution`` (a training step must see exactly its own forward
    passes). Any failure just skips the early check (the method's own
    evaluation then reports the problem).

    Why one real row and not fake tensors: ``FakeTensorMode`` shape inference was
    measured at 1.7 ms for a 3-layer MLP (a real gradient call: 0.2 ms), 8 ms for
    the benchmarks' small CNN and 210 ms for the ResNet-50-like benchmark net
    (320 parameter tensors to convert; a real one-row forward: 23-36 ms on the
    same CPU), a fixed cost per call; one row costs 1/B of a forward, and at most
    1/(points x B) of the work of a method that folds points into the batch.
    """

    def __init__(self, model_fn: Any, params: Any, xs: tuple[Tensor, ...]) -> None:
        self.model_fn, self.params, self.xs = model_fn, params, xs
        self.enabled = (
            not torch.compiler.is_compiling() and not inside_transform() and not keeps_graph() and is_concrete(*xs)
        )
        self.ran = False
        self.out: Tensor | None = None
        self.error: Exception | None = None

    def _eval(self, xs: tuple[Tensor, ...]) -> Any:
        with torch.no_grad():
            return self.model_fn(self.params, *(t[:1] for t in xs))

    def run(self) -> Tensor | None:
        """The output on one row, or ``None`` when the probe is disabled or failed."""
        if self.enabled and not self.ran:
            self.ran = True
            try:
                out = self._eval(self.xs)
            except Exception as e:  # the method's own evaluation reports it
                self.error = e
            else:
                rows = min(self.xs[0].shape[0], 1)
                if isinstance(out, Tensor) and out.ndim >= 1 and out.shape[0] == rows:
                    self.out = out
        return self.out

    def shape(self, batch: int) -> tuple[int, ...] | None:
        out = self.run()
        return None if out is None else (batch, *out.shape[1:])

    def check(self, resolved: ResolvedTarget) -> ResolvedTarget:
        """``resolved`` validated against the output shape (``checked`` when it could be)."""
        out = self.run()
        if out is None:
            return resolved
        shape = (resolved.batch if resolved.batch is not None else out.shape[0], *out.shape[1:])
        if resolved.kind == "callable" and not isinstance(resolved.value, PerSampleIndex):
            try:
                with torch.no_grad():
                    value = resolved.value(out)
            except Exception:
                return resolved  # e.g. a callable written for the full batch; select checks it at the first call
            _check_callable_value(value, out.shape[0], lambda: shape)
            return resolved
        _check_against(resolved, tuple(out.shape[1:]), lambda: shape, values=True)
        return replace(resolved, checked=True)

    def check_dtypes(self, mismatch: str) -> None:
        """``x`` and ``params`` differ in dtype: raise a TypeError naming both if the model fails on the mix."""
        if self.run() is not None or self.error is None or not self.enabled:
            return
        dtype = next((v.dtype for v in self.params.values() if v.is_floating_point()), None)
        try:
            self._eval(tuple(t.to(dtype) for t in self.xs))
        except Exception:
            return  # fails for another reason too: let the method report it
        raise TypeError(f"{mismatch} (the model fails on the mix: {self.error})") from self.error


# language-model targets (API §9): ax.targets.next_token(...), contrast(...), continuation(...)
from .lm import continuation, contrast, next_token  # noqa: E402
