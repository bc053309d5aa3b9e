"""Models as pure functions, and the argument checks every method shares.

``functionalize`` turns an ``nn.Module`` into ``model_fn(params, *x)`` plus its
parameters and buffers. The checks below run at the public boundary of every
method, before any ``torch.func`` transform is entered; checks that need tensor
*values* are skipped when the tensors are symbolic (under ``vmap``, ``grad``,
``torch.compile`` or export tracing), where a Python branch on a value is
impossible.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._types import ModelFn, Params, TensorOrTuple

__all__ = ["FunctionalModel", "functionalize"]


class FunctionalModel:
    """``model_fn(params, *x)`` for a module, as returned by :func:`functionalize`.

    Calls the module with ``torch.func.functional_call``, so the tensors in
    ``params`` (not the module's own) are used and gradients with respect to
    them are exact. The module itself is never changed: ``functional_call``
    swaps tensors in for the duration of a call and puts the originals back;
    a lock makes concurrent calls from several threads safe.

    The object also memoises the traced graphs that rule-based methods need
    (see :mod:`attrax.rewrite`); the memo only saves time, it never changes a
    result.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._lock = threading.RLock()
        self._programs: dict[Any, Any] = {}

    def __call__(self, params: Params, *x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return torch.func.functional_call(self.module, dict(params), x, strict=False)
        with self._lock:
            return torch.func.functional_call(self.module, dict(params), x, strict=False)

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self.module).__name__})"


def functionalize(module: nn.Module | Callable[..., Tensor]) -> tuple[FunctionalModel, dict[str, Tensor]]:
    r"""Turn a module into a pure function and its parameters.

    Args:
        module: The model, put in eval mode by the caller. A plain function
            ``f(params, *x)`` is accepted too and wrapped so that rule-based
            methods can reuse its traced graph between calls (``params`` is then
            empty).
    Returns:
        ``(model_fn, params)`` where ``model_fn(params, *x)`` equals
        ``module(*x)`` and ``params`` maps the dotted names of the module's
        parameters and buffers to the module's own tensors (no copies).
    Raises:
        TypeError: If ``module`` is neither an ``nn.Module`` nor callable.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Linear(3, 2).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> x = torch.ones(4, 3)
        >>> torch.equal(model_fn(params, x), net(x))
        True
    """
    if isinstance(module, nn.Module):
        params = dict(module.named_parameters())
        params.update(dict(module.named_buffers()))
        return FunctionalModel(module), params
    if callable(module):
        return _FunctionModel(module), {}
    raise TypeError(f"module must be a torch.nn.Module or a callable f(params, *x), got {type(module).__name__}")


class _FunctionModel(FunctionalModel):
    """Wraps a plain ``f(params, *x)`` so traced graphs can be memoised on it."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.module = None  # type: ignore[assignment]
        self._lock = threading.RLock()
        self._programs = {}

    def __call__(self, params: Params, *x: Tensor) -> Tensor:
        return self.fn(params, *x)

    def __repr__(self) -> str:
        return f"FunctionalModel({getattr(self.fn, '__name__', 'fn')})"


# --------------------------------------------------------------------------- checks


def is_concrete(*tensors: Any) -> bool:
    """True when tensor values can be inspected in Python (no transform, no tracing)."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    for t in tensors:
        if not isinstance(t, Tensor):
            continue
        if isinstance(t, FakeTensor) or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
        if type(t) is not Tensor and not isinstance(t, nn.Parameter):
            return False  # proxies and other tensor subclasses
    return True


def inside_transform() -> bool:
    """True under ``torch.func.grad/vjp/vmap/jvp`` (any functorch level is active)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


@dataclass
class _TrainingCall:
    """An active :func:`attrax.value_and_attribution` call: its inputs, and the output at them once seen."""

    xs: tuple[Tensor, ...]
    output: Any = None
    seen: bool = False


#: Per thread and per context (not process-global): set only for the duration of one
#: ``value_and_attribution`` call, so methods running elsewhere are unaffected.
_TRAINING: contextvars.ContextVar[_TrainingCall | None] = contextvars.ContextVar("attrax_training_call", default=None)


@contextlib.contextmanager
def training_call(xs: tuple[Tensor, ...]) -> Iterator[_TrainingCall]:
    """Within: methods keep autograd history (differentiable w.r.t. params) and report the output at ``xs``."""
    call = _TrainingCall(xs)
    token = _TRAINING.set(call)
    try:
        yield call
    finally:
        _TRAINING.reset(token)


def keeps_graph() -> bool:
    """True inside ``value_and_attribution``: results must stay differentiable w.r.t. params.

    Never inside ``torch.compile`` (dynamo cannot read context variables; compiled code takes the
    composable paths anyway).
    """
    if torch.compiler.is_compiling():
        return False
    return _TRAINING.get() is not None


def publish_output(xs: tuple[Tensor, ...], output: Any) -> None:
    """A method evaluated the model at ``xs``: hand the output to ``value_and_attribution`` if these are its inputs."""
    if torch.compiler.is_compiling():
        return
    call = _TRAINING.get()
    if call is None or call.seen or len(xs) != len(call.xs):
        return
    if all(a is b for a, b in zip(xs, call.xs)):
        call.output, call.seen = output, True


def detach_outside_transforms(params: Params, xs: tuple[Tensor, ...]) -> tuple[Params, tuple[Tensor, ...]]:
    """Cut regular-autograd history at the method boundary unless a ``torch.func`` transform is active.

    Called eagerly, a method returns plain tensors, like Captum: recording the
    backward pass for a possible second differentiation would keep every
    step's graph alive (measured 3.6x the peak memory of IG). Under
    ``torch.func.grad``/``jacrev``/``vmap`` nothing is detached, so gradients of
    attributions w.r.t. params and inputs are exact; ``value_and_attribution``
    keeps regular-autograd history on purpose.
    """
    if not torch.compiler.is_compiling() and inside_transform():
        return params, xs
    if not torch.is_grad_enabled() or keeps_graph():
        return params, xs
    return {k: v.detach() for k, v in params.items()}, tuple(t.detach() for t in xs)


@contextlib.contextmanager
def eager_no_grad() -> Iterator[None]:
    """No autograd recording for top-level eager calls of methods that never need it."""
    if torch.compiler.is_compiling() or inside_transform() or not torch.is_grad_enabled() or keeps_graph():
        yield
    else:
        with torch.no_grad():
            yield


def as_tuple(x: TensorOrTuple, name: str = "x") -> tuple[tuple[Tensor, ...], bool]:
    """Return ``(inputs, was_tuple)``; a single tensor becomes a 1-tuple."""
    if isinstance(x, Tensor):
        return (x,), False
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, Tensor) for t in x):
        return tuple(x), True
    raise TypeError(f"{name} must be a Tensor or a non-empty tuple of Tensors, got {_describe(x)}")


def check_model(model_fn: Any, params: Any) -> None:
    """Validate ``model_fn`` and ``params``."""
    if isinstance(model_fn, nn.Module):
        raise TypeError(
            "model_fn must be a pure function model_fn(params, *x), got an nn.Module; "
            "use `model_fn, params = ax.functionalize(module)`"
        )
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable as model_fn(params, *x), got {_describe(model_fn)}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping from names to tensors, got {_describe(params)}")
    for k, v in params.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise TypeError(f"params must map str to Tensor, got entry {k!r}: {_describe(v)}")


def check_inputs(xs: tuple[Tensor, ...], name: str = "x", check_finite: bool = True) -> int:
    """Validate model inputs; return the batch size."""
    batch = None
    for i, t in enumerate(xs):
        label = name if len(xs) == 1 else f"{name}[{i}]"
        if not t.is_floating_point():
            raise TypeError(f"{label} must be a floating point tensor, got dtype {t.dtype}")
        if t.ndim < 1:
            raise ValueError(f"{label} must have a batch dimension, got a 0-d tensor")
        if batch is None:
            batch = t.shape[0]
        elif t.shape[0] != batch:
            raise ValueError(f"all inputs must share the batch size: {label} has {t.shape[0]}, expected {batch}")
        # one reduction is finite iff every element is (or the sum overflowed: then check exactly)
        if check_finite and is_concrete(t) and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label} must be finite; it contains NaN or inf (pass check_finite=False to allow)")
    assert batch is not None
    return batch


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> None:
    """``value`` must be an int >= 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "a positive int or None" if allow_none else "a positive int"
        raise TypeError(f"{name} must be {what}, got {_describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_nonnegative(value: Any, name: str) -> float:
    """``value`` must be a real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a non-negative number, got {_describe(value)}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {_describe(generator)}")


def broadcast_baseline(baseline: Any, x: Tensor, name: str = "baseline") -> Tensor:
    """A reference input with the shape, dtype and device of ``x``.

    ``None`` means zeros; a number fills; a tensor must broadcast to ``x``.
    """
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if not isinstance(baseline, Tensor):
        raise TypeError(f"{name} must be None, a number or a Tensor broadcastable to x, got {_describe(baseline)}")
    try:
        shape = torch.broadcast_shapes(baseline.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"{name} of shape {tuple(baseline.shape)} does not broadcast to x of shape {tuple(x.shape)}"
        )
    return baseline.to(dtype=x.dtype, device=x.device).expand_as(x)


def baselines_for(baseline: Any, xs: tuple[Tensor, ...], name: str = "baseline") -> tuple[Tensor, ...]:
    """Per-input baselines for a tuple of inputs."""
    if isinstance(baseline, (tuple, list)):
        if len(baseline) != len(xs):
            raise ValueError(f"{name} has {len(baseline)} entries but x has {len(xs)} inputs")
        return tuple(broadcast_baseline(b, t, f"{name}[{i}]") for i, (b, t) in enumerate(zip(baseline, xs)))
    return tuple(broadcast_baseline(baseline, t, name) for t in xs)


def chunks(n: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(n)`` with at most ``chunk_size`` each."""
    step = n if chunk_size is None else chunk_size
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (int, float, str)) else type(value).__name__
