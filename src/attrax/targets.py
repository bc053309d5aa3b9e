"""Target resolution: which scalar per sample is explained (API.md section 2).

``check_target`` runs at the public boundary, before any transform, with what
can be known without running the model (types, lengths). ``select`` runs on the
model output inside the differentiated function and checks everything that
needs the output shape, before the backward pass; value checks (index ranges)
are skipped when the target is symbolic (under ``vmap`` over targets or
``torch.compile``), where they cannot be made.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .core import _describe, is_concrete

__all__ = ["ResolvedTarget", "check_target", "prepare_call", "repeat_target", "select"]


@dataclass(frozen=True)
class ResolvedTarget:
    """A validated target.

    ``kind`` is one of ``"none"``, ``"int"``, ``"index"`` (tuple into non-batch
    dims), ``"tensor"`` (a long tensor: 0-d for one class for all samples, or
    ``(B,)`` per sample) and ``"callable"``.
    """

    kind: str
    value: Any


def check_target(target: Any, batch_size: int) -> ResolvedTarget:
    """Validate ``target`` as far as possible without the model output."""
    if target is None:
        return ResolvedTarget("none", None)
    if isinstance(target, bool):
        raise TypeError(f"target must be an int, a sequence of ints, a tuple, a callable or None, got bool {target}")
    if isinstance(target, numbers.Integral):
        return ResolvedTarget("int", int(target))
    if isinstance(target, tuple):
        if not target or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target):
            raise TypeError(f"target tuple must hold ints indexing the non-batch dims, got {target!r}")
        return ResolvedTarget("index", tuple(int(t) for t in target))
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target tensor must hold integers (a LongTensor), got dtype {target.dtype}")
        if target.ndim > 1:
            raise ValueError(f"target tensor must be 0-d or of shape (B,), got shape {tuple(target.shape)}")
        if target.ndim == 1 and target.shape[0] != batch_size:
            raise ValueError(
                f"target has {target.shape[0]} entries but the batch has {batch_size} samples"
            )
        return ResolvedTarget("tensor", target.long())
    if isinstance(target, np.ndarray) or (isinstance(target, Sequence) and not isinstance(target, str)):
        arr = np.asarray(target)
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise TypeError(f"target sequence must be a flat sequence of ints, got {target!r}")
        if arr.shape[0] != batch_size:
            raise ValueError(f"target has {arr.shape[0]} entries but the batch has {batch_size} samples")
        return ResolvedTarget("tensor", torch.as_tensor(arr, dtype=torch.long))
    if callable(target):
        return ResolvedTarget("callable", target)
    raise TypeError(
        f"target must be an int, a sequence of ints, a LongTensor, a tuple of ints, a callable or None, "
        f"got {_describe(target)}"
    )


def select(out: Tensor, target: ResolvedTarget) -> Tensor:
    """One scalar per sample, shape ``(B,)``, chosen by ``target`` from ``out``."""
    if not isinstance(out, Tensor):
        raise TypeError(f"model_fn must return a Tensor of shape (B, ...), got {_describe(out)}")
    if out.ndim == 0:
        raise ValueError("model_fn returned a 0-d tensor; the output must have a batch dimension (B, ...)")
    batch = out.shape[0]
    kind, t = target.kind, target.value
    if kind == "none":
        if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
            return out.reshape(batch)
        raise ValueError(
            f"target is None but the output has shape {tuple(out.shape)}; None is allowed only for outputs of "
            f"shape (B,) or (B, 1): pass a class index, a per-sample sequence, a tuple index or a callable"
        )
    if kind == "int":
        _need_2d(out, "an int")
        n = out.shape[1]
        if not -n <= t < n:
            raise ValueError(f"target {t} is out of range for output of shape {tuple(out.shape)} (expected 0 <= target < {n})")
        return out[:, t]
    if kind == "index":
        if len(t) != out.ndim - 1:
            raise ValueError(
                f"target tuple {t} has {len(t)} indices but the output of shape {tuple(out.shape)} has "
                f"{out.ndim - 1} non-batch dims"
            )
        for i, (idx, n) in enumerate(zip(t, out.shape[1:])):
            if not -n <= idx < n:
                raise ValueError(f"target tuple {t} is out of range at position {i} for output of shape {tuple(out.shape)}")
        return out[(slice(None),) + t]
    if kind == "tensor":
        _need_2d(out, "a tensor")
        idx = t.to(out.device)
        if is_concrete(idx) and bool(((idx < 0) | (idx >= out.shape[1])).any()):
            raise ValueError(
                f"target values must lie in [0, {out.shape[1]}) for output of shape {tuple(out.shape)}, got "
                f"min {int(idx.min())} and max {int(idx.max())}"
            )
        if idx.ndim == 1 and idx.shape[0] != batch:
            raise ValueError(f"target has {idx.shape[0]} entries but the output of shape {tuple(out.shape)} has {batch} rows")
        return out.gather(1, idx.expand(batch).unsqueeze(1)).squeeze(1)
    fn: Callable[[Tensor], Tensor] = t
    value = fn(out)
    if not isinstance(value, Tensor) or tuple(value.shape) != (batch,):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"a callable target must return one scalar per sample, shape ({batch},); got {got} for output of shape {tuple(out.shape)}")
    return value


def repeat_target(target: ResolvedTarget, times: int) -> ResolvedTarget:
    """The target for a batch made of ``times`` stacked copies of the original batch."""
    if target.kind == "tensor" and target.value.ndim == 1:
        return ResolvedTarget("tensor", target.value.repeat(times))
    return target


def _need_2d(out: Tensor, what: str) -> None:
    if out.ndim != 2:
        raise ValueError(
            f"target is {what}, which selects out[:, t], but the output has shape {tuple(out.shape)}; "
            f"use a tuple index (one int per non-batch dim) or a callable"
        )


def prepare_call(
    model_fn: Any, params: Any, x: Any, target: Any, *, check_finite: bool = True, detach: bool = True
) -> tuple[tuple[Tensor, ...], Any, bool, int, ResolvedTarget]:
    """The boundary checks every method starts with.

    Returns ``(inputs, params, x_was_tuple, batch_size, resolved_target)``; inputs
    and params are detached from regular autograd when no ``torch.func``
    transform is active (see ``core.detach_outside_transforms``).
    """
    from .core import as_tuple, check_inputs, check_model, detach_outside_transforms

    check_model(model_fn, params)
    xs, is_tuple = as_tuple(x)
    batch = check_inputs(xs, check_finite=check_finite)
    resolved = check_target(target, batch)
    if detach:
        params, xs = detach_outside_transforms(params, xs)
    return xs, params, is_tuple, batch, resolved
