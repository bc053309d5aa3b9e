"""Serving and training: compiled explainers, exported attribution programs, one-forward training.

    >>> explain = ax.compile(ax.integrated_gradients, model_fn, params, n_steps=32)   # doctest: +SKIP
    >>> attr = explain(x, target)                       # compiled once, reused across batches and targets
    >>> prog = ax.export(ax.deeplift, model_fn, params, x, target)                     # doctest: +SKIP
    >>> torch.export.save(prog, "explain.pt2")          # loads and runs without attrax
    >>> out, attr = ax.value_and_attribution(ax.input_x_gradient, model_fn, params, x, target)  # doctest: +SKIP

* :func:`compile` wraps ``torch.compile`` (``fullgraph=True``). Targets are always tensor inputs
  (an int becomes a ``(B,)`` tensor before the compiled region), so new targets never recompile;
  ``batch_size=`` cuts large inputs into equal pieces inside the call, padding the last one, so
  one compiled graph serves every input size.
* :func:`export` traces the whole attribution - model, backward rules and all - into one ATen
  graph with ``make_fx`` on a symbolic batch, then hands that graph to ``torch.export`` with a
  dynamic batch dimension (``notes/decisions.md`` says why this route). The program needs
  neither attrax nor the model's Python code to run. Methods that draw noise (SmoothGrad,
  ``noise_tunnel``) take a third input, an integer ``seed``, and draw their noise from it with
  :func:`seeded_normal`, a counter-based generator made of plain integer ops.
* :func:`value_and_attribution` runs a method so that its result stays differentiable w.r.t.
  ``params`` under plain autograd, and returns the model output from the same forward pass
  where the method evaluates the model at ``x`` (gradient methods, DeepLift, LRP, guided
  backprop, conditional); methods that never evaluate it there (IG, SmoothGrad) get one extra
  forward. Nothing is switched on a module or global: the state lives in a context variable for
  the duration of the call.
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target, TensorOrTuple
from .core import (BoundModel, FunctionalModel, as_tuple, bind_forward_args, check_compiled_embedding,
                   check_embedding_ids, check_positive_int, per_sample_tensors, training_call)
from .targets import prepare_call, select

__all__ = ["Explainer", "compile", "export", "seeded_normal", "value_and_attribution"]

_COMPILE_KEYS = ("backend", "mode", "dynamic", "options")


# ------------------------------------------------------------------------------ targets


def _target_input(target: Any, batch: int, device: torch.device) -> Any:
    """Ints and per-sample sequences become a ``(B,)`` LongTensor, so the compiled graph takes them as input."""
    if isinstance(target, bool):
        return target  # prepare_call rejects it with the usual message
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=device)
    if isinstance(target, (list, range)) and all(isinstance(v, int) and not isinstance(v, bool) for v in target):
        return torch.tensor(list(target), dtype=torch.long, device=device)
    if isinstance(target, Tensor) and target.ndim == 0 and not target.is_floating_point():
        return target.to(torch.long).expand(batch).clone()
    return target


def _check_attribute(attribute: Any) -> None:
    if not callable(attribute):
        raise TypeError(f"attribute must be an attrax method such as ax.integrated_gradients, got {type(attribute).__name__}")


# ------------------------------------------------------------------------------ compile


class Explainer:
    """A compiled attribution function ``explain(x, target)`` made by :func:`compile`.

    ``explain.fn`` is the compiled callable; ``explain.batch_size`` the piece size.
    """

    def __init__(self, fn: Callable[..., TensorOrTuple], batch_size: int | None, description: str,
                 model_fn: Any = None, rebuild: Callable[[], Callable[..., TensorOrTuple]] | None = None,
                 eager: Callable[..., TensorOrTuple] | None = None, holder: dict[str, Any] | None = None,
                 forward_args: Any = None) -> None:
        self.fn = fn
        self._eager = eager
        self.batch_size = batch_size
        self._description = description
        # a compiled graph is a cache of the model's trace: rebuilt when the model changes (fingerprint)
        self._model_fn, self._rebuild = model_fn, rebuild
        self._fingerprint = model_fn.fingerprint() if isinstance(model_fn, FunctionalModel) else None
        # additional_forward_args: bound outside the compiled code (rule methods trace the bound model there) for
        # the batch of each call's x; ``holder["model_fn"]`` is what the compiled function calls
        self._holder, self._forward_args, self._unbound = holder, forward_args, model_fn
        self._per_batch: dict[int, tuple[Any, Any, Any]] = {}  # batch -> (bound model, compiled fn, fingerprint)
        self._binding = threading.Lock()  # a call binds, then runs what it bound (the holder is shared)

    _KEPT_BATCHES = 8

    def _bind(self, xs: tuple[Tensor, ...], batch: int) -> None:
        bound = self._holder["model_fn"] if self._holder is not None else None
        if self._forward_args is None or (isinstance(bound, BoundModel) and bound.batch == batch):
            return
        if (isinstance(bound, BoundModel) and not bound.per_sample()
                and not per_sample_tensors(self._forward_args, batch)):
            return  # shared values only, for this batch as for the bound one: the same model (one dynamic graph)
        if isinstance(bound, BoundModel):  # kept: alternating batch sizes reuse their graphs (the latest few)
            self._per_batch[bound.batch] = (bound, self.fn, self._fingerprint)
            while len(self._per_batch) > self._KEPT_BATCHES:
                self._per_batch.pop(next(iter(self._per_batch)))
        if batch in self._per_batch:
            bound, self.fn, self._fingerprint = self._per_batch.pop(batch)
        else:
            bound = bind_forward_args(self._unbound, self._forward_args, tuple(xi[:1].expand(batch, *xi.shape[1:])
                                                                               for xi in xs))
            self._fingerprint = None if self._fingerprint is None else bound.fingerprint()
            if self._rebuild is not None and isinstance(self._holder["model_fn"], BoundModel):
                self.fn = self._rebuild()  # the first binding keeps the function compile() built
        self._holder["model_fn"] = self._model_fn = bound

    def _current(self) -> Callable[..., TensorOrTuple]:
        if self._fingerprint is not None and self._rebuild is not None:
            now = self._model_fn.fingerprint()
            if now != self._fingerprint:
                self.fn, self._fingerprint = self._rebuild(), now
        return self.fn

    def __repr__(self) -> str:
        return f"Explainer({self._description}, batch_size={self.batch_size})"

    def __call__(self, x: TensorOrTuple, target: Target = None) -> TensorOrTuple:
        try:
            return self._call(x, target)
        except (ValueError, TypeError):
            raise
        except Exception as e:
            # a bad argument or a refused op inside the compiled region reaches here wrapped by dynamo:
            # the method run eagerly raises its own, clear error
            if self._eager is not None:
                try:
                    self._eager(x, target)
                except (ValueError, TypeError) as clear:
                    raise clear from e
            raise

    def _call(self, x: TensorOrTuple, target: Target = None) -> TensorOrTuple:
        # the method's options (n_steps, epsilons) are constants of the graph: with dynamic=True dynamo made the
        # ints symbolic, and quadrature(method, n_steps), evaluated once at trace time, could not take them
        with torch._dynamo.config.patch(specialize_int=True, specialize_float=True):
            return self._call_now(x, target)

    def _call_now(self, x: TensorOrTuple, target: Target = None) -> TensorOrTuple:
        if self._forward_args is None:
            return self._run(x, target)
        with self._binding:
            return self._run(x, target)

    def _run(self, x: TensorOrTuple, target: Target = None) -> TensorOrTuple:
        xs, is_tuple = as_tuple(x)
        batch = xs[0].shape[0]
        t = _target_input(target, batch, xs[0].device)
        size = self.batch_size
        if self._forward_args is not None:
            if size is not None and batch != size and per_sample_tensors(self._forward_args, batch):
                raise ValueError(f"batch_size={size} cuts x into pieces, but not additional_forward_args: a tensor "
                                 f"of them has x's {batch} rows; pass batch_size=None, or call the explainer once "
                                 f"per batch")
            self._bind(xs, batch if size is None else size)  # pieces of batch_size rows meet shared values only
        check_embedding_ids(self._model_fn, None, xs)  # (eagerly, on the bound model: compiled code cannot check)
        check_compiled_embedding(self._model_fn)
        fn = self._current()
        if size is None or batch == size:
            return fn(x, t)
        per_sample = isinstance(t, Tensor) and t.ndim >= 1 and t.shape[0] == batch
        pieces: list[tuple[Tensor, ...]] = []
        for start in range(0, batch, size):
            stop = min(start + size, batch)
            part = tuple(xi[start:stop] for xi in xs)
            part_t = t[start:stop] if per_sample else t
            short = size - (stop - start)
            if short:  # pad the last piece to the compiled size: no recompile for a remainder
                part = tuple(torch.cat([p, p[-1:].expand(short, *p.shape[1:])]) for p in part)
                if per_sample:
                    part_t = torch.cat([part_t, part_t[-1:].expand(short, *part_t.shape[1:])])
            out, _ = as_tuple(fn(part if is_tuple else part[0], part_t), "attribute(...)")
            pieces.append(tuple(o[: stop - start] for o in out))
        result = tuple(torch.cat(col) for col in zip(*pieces))
        return result if is_tuple else result[0]


def compile(  # noqa: A001 - the API name
    attribute: Callable[..., TensorOrTuple],
    model_fn: ModelFn,
    params: Params,
    *,
    backend: Any = "inductor",
    mode: str | None = None,
    dynamic: bool | None = None,
    options: dict[str, Any] | None = None,
    fullgraph: bool = True,
    batch_size: int | None = None,
    **method_kwargs: Any,
) -> Explainer:
    """Compile ``attribute(model_fn, params, x, target, **method_kwargs)`` once for reuse.

    Args:
        attribute: An attrax method (any ``(model_fn, params, x, target, **kw)`` function).
        backend, mode, dynamic, options: Passed to ``torch.compile``. With ``dynamic=None`` the
            first call compiles for its batch size and a second size recompiles once with a
            symbolic batch, after which no size recompiles.
        fullgraph: Passed to ``torch.compile``; every attrax method compiles without graph breaks.
        batch_size: Cut inputs larger than this into pieces of exactly this size (the last one
            padded with copies of its last sample), all served by one compiled graph.
        **method_kwargs: Options of ``attribute`` (e.g. ``n_steps``, ``composite``, ``baselines``).
            ``additional_forward_args`` are bound outside the compiled code for each call's batch (rule methods
            trace the bound model; an in-place edit of a bound tensor rebuilds the graph); they are the values
            given here (a dict is copied), and ``batch_size`` cannot cut per-sample ones.
    Returns:
        :class:`Explainer` ``explain(x, target)``; ``target`` as in API.md section 2, always
        passed to the graph as a tensor input.

    Example:
        >>> import torch, attrax as ax
        >>> model_fn, params = ax.functionalize(torch.nn.Linear(3, 2).eval())
        >>> explain = ax.compile(ax.saliency, model_fn, params, backend="eager")
        >>> explain(torch.randn(4, 3), 1).shape
        torch.Size([4, 3])
    """
    _check_attribute(attribute)
    check_positive_int(batch_size, "batch_size", allow_none=True)
    if dynamic is not None and not isinstance(dynamic, bool):
        raise TypeError(f"dynamic must be True, False or None, got {type(dynamic).__name__}")
    if n_steps_auto(method_kwargs):
        raise ValueError('n_steps="auto" cannot be compiled (its loop depends on the data); pass a fixed n_steps')

    forward_args = method_kwargs.pop("additional_forward_args", None)
    # with additional_forward_args, the Explainer binds them for each call's batch, outside the compiled code
    # (rule methods trace the bound model at compile time), and follows the bound model's fingerprint (the
    # arguments' values included)
    holder = {"model_fn": model_fn}

    def run(x: TensorOrTuple, target: Target) -> TensorOrTuple:
        return attribute(holder["model_fn"], params, x, target, **method_kwargs)

    def build() -> Callable[..., TensorOrTuple]:
        # a code object of its own for each build: dynamo keeps its compiled graphs on the code object, and a
        # rebuild after a change its guards cannot see (a bound mask edited in place, baked into a rule method's
        # program) must not find the old graph there; and a name of its own, because dynamo's record of what varied
        # between compiles is keyed on file, line and name: a second explainer with another composite had its
        # epsilons turned symbolic, and LRP could not take them as constants
        name = f"explain_{next(_BUILDS)}"
        fresh = types.FunctionType(run.__code__.replace(co_name=name, co_qualname=name), run.__globals__, name,
                                   run.__defaults__, run.__closure__)
        return torch.compile(fresh, backend=backend, mode=mode, dynamic=dynamic, options=options, fullgraph=fullgraph)

    return Explainer(build(), batch_size, getattr(attribute, "__name__", repr(attribute)), model_fn, build, run,
                     holder, forward_args)


_BUILDS = itertools.count()


def n_steps_auto(kwargs: dict[str, Any]) -> bool:
    return isinstance(kwargs.get("n_steps"), str)


# ------------------------------------------------------------------------------- export


def _draws_noise(attribute: Any) -> bool:
    """Methods that take pre-drawn ``noise`` and a ``stdev`` (SmoothGrad, noise_tunnel)."""
    try:
        names = inspect.signature(attribute).parameters
    except (TypeError, ValueError):
        return False
    return "noise" in names and "stdev" in names and "n_samples" in names


def export(
    attribute: Callable[..., TensorOrTuple],
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    seed: int | Tensor = 0,
    **method_kwargs: Any,
) -> torch.export.ExportedProgram:
    """Export ``attribute`` as a ``torch.export.ExportedProgram`` with a dynamic batch dimension.

    ``prog.module()(x, target)`` returns the attributions for any batch size; ``target`` is a
    ``(B,)`` integer tensor (the example's int target is turned into one). For methods that draw
    noise (``ax.smoothgrad``, ``ax.noise_tunnel``) the program is ``(x, target, seed)`` with ``seed``
    an int64 scalar tensor; the noise is ``stdev * seeded_normal(seed, (n_samples, *x.shape))``,
    so ``ax.smoothgrad(..., noise=stdev * ax.serving.seeded_normal(seed, shape))`` is its eager twin.
    For scalar-output models (``target=None``) the program is ``(x,)``. The per-sample tensors of
    ``additional_forward_args`` (first dim = the batch: attention masks, position ids) are the program's last
    inputs, in their order (a dict's in its key order): ``prog.module()(x, target, mask)``; its other values
    are constants. Rule methods (DeepLift, LRP) trace the model into a program of their own with those
    tensors' values in it, so they export without per-sample arguments only.

    Args:
        attribute: A gradient method, IG, SmoothGrad/noise_tunnel, DeepLift, DeepLiftShap, LRP,
            guided backprop or deconvnet (any method whose loop structure does not depend on
            values).
        x, target: An example call. Parameters and keyword tensors (``baselines``...) become
            constants of the program.
        seed: The example seed for noise-drawing methods.
        **method_kwargs: Options of ``attribute``.
    Raises:
        ValueError/TypeError: Bad arguments (checked on the example before tracing), or
            ``n_steps="auto"``.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    _check_attribute(attribute)
    if n_steps_auto(method_kwargs):
        raise ValueError('n_steps="auto" cannot be exported (its loop depends on the data); pass a fixed n_steps')
    if "generator" in method_kwargs:
        raise ValueError("export draws noise from its seed input; do not pass generator=")
    forward_args = method_kwargs.pop("additional_forward_args", None)
    real_ids = isinstance(forward_args, Mapping) and isinstance(forward_args.get("input_ids"), Tensor)
    xs, checked_params, is_tuple, batch, resolved = prepare_call(model_fn, params, x, target, check_ids=not real_ids)
    per_sample, rebind = _per_sample_args(forward_args, batch)
    with torch.no_grad():  # the example must run, and the target fit its output, before tracing
        example_fn = model_fn if forward_args is None else bind_forward_args(model_fn, forward_args, xs)
        select(example_fn(checked_params, *xs), resolved)
    t = _target_input(target, batch, xs[0].device)
    if target is not None and not (isinstance(t, Tensor) and t.ndim == 1):
        raise TypeError("export needs an int or per-sample integer target (it becomes the program's (B,) target input); "
                        f"got {type(target).__name__}")
    noisy = _draws_noise(attribute)
    if noisy:
        n_samples = method_kwargs.pop("n_samples", 25)
        stdev = float(method_kwargs.pop("stdev", 1.0))
        check_positive_int(n_samples, "n_samples")
    # trace at a batch of at least 2 (size-1 dims are specialised by symbolic tracing) that equals no
    # other dim of x (symbolic tracing would unify the two and refuse the batch as dynamic)
    others = {int(d) for xi in (*xs, *per_sample) for d in xi.shape[1:]}
    size = max(batch, 2)
    while size in others:
        size += 1
    rows = torch.arange(size, device=xs[0].device) % max(batch, 1)
    ex = tuple(xi if size == batch else xi[rows].clone() for xi in xs)
    ex_t = t if t is None or size == batch or t.ndim == 0 else t[rows].clone()
    ex_x = ex if is_tuple else ex[0]

    def attribution(xv: TensorOrTuple, *rest: Tensor) -> TensorOrTuple:
        if per_sample:
            method_kwargs["additional_forward_args"] = rebind(rest[len(rest) - len(per_sample):])
            rest = rest[:len(rest) - len(per_sample)]
        tv = rest[0] if target is not None else None
        if not noisy:
            return attribute(model_fn, params, xv, tv, **method_kwargs)
        seed_v = rest[-1]
        parts, _ = as_tuple(xv)
        noise = tuple(
            stdev * seeded_normal(seed_v + 7919 * i, (n_samples, *p.shape), dtype=p.dtype, device=p.device)
            for i, p in enumerate(parts)
        )
        return attribute(model_fn, params, xv, tv, n_samples=n_samples, noise=noise if is_tuple else noise[0],
                         **method_kwargs)

    inputs: list[Any] = [ex_x]
    if target is not None:
        inputs.append(ex_t)
    if noisy:
        inputs.append(torch.as_tensor(seed, dtype=torch.long).reshape(()))
    inputs.extend(a if size == batch else a[rows].clone() for a in per_sample)
    if forward_args is not None and not per_sample:
        method_kwargs["additional_forward_args"] = forward_args
    name = getattr(attribute, "__name__", "attribute")
    try:
        graph = make_fx(attribution, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*inputs)
    except (TypeError, ValueError):
        raise
    except Exception as e:
        hint = ("methods that draw random numbers need a noise= argument, and loops must not depend on values")
        if per_sample and "data-dependent" in str(e):
            hint = ("the model branches on the values of an additional_forward_args tensor, an input of the program "
                    "(HF models check a 2-D attention_mask for padding); pass what it builds from it instead, e.g. "
                    "a 4-D additive mask and position ids")
        raise ValueError(f"could not trace {name} for export ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"{hint}") from e
    dim = torch.export.Dim("batch", min=1)
    shapes: list[Any] = [tuple({0: dim} for _ in ex) if is_tuple else {0: dim}]
    if target is not None:
        shapes.append({0: dim})
    if noisy:
        shapes.append(None)
    shapes.extend({0: dim} for _ in per_sample)
    try:
        return torch.export.export(graph, tuple(inputs), dynamic_shapes=tuple(shapes), strict=False)
    except Exception as e:
        hint = ""
        if per_sample:
            hint = (f"; the program takes each tensor of additional_forward_args whose first dim is the example's batch "
                    f"({batch}) as a per-sample input with a dynamic batch ({len(per_sample)} here): if one of them is "
                    f"shared, export with an example batch of another size")
        raise ValueError(f"{name} traced, but its graph does not export with a dynamic batch ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}){hint}") from e


def _per_sample_args(args: Any, batch: int) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], Any]]:
    """The per-sample tensors of ``additional_forward_args`` (program inputs of an export) and how to put
    the program's inputs back in their places."""
    if args is None:
        return [], lambda ts: None
    if isinstance(args, Mapping):
        keys, values = list(args), list(args.values())
    else:
        keys, values = None, list(args) if isinstance(args, (tuple, list)) else [args]
    at = [i for i, v in enumerate(values) if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == batch]
    if any(per_sample_tensors(v, batch) for i, v in enumerate(values) if i not in at):
        raise ValueError("additional_forward_args: export takes per-sample tensors at the top level only (each "
                         "becomes a program input); one is nested inside a container")

    def rebind(ts: Sequence[Tensor]) -> Any:
        out = list(values)
        for i, t in zip(at, ts):
            out[i] = t
        return dict(zip(keys, out)) if keys is not None else tuple(out)

    return [values[i] for i in at], rebind


# --------------------------------------------------------------------------- seeded noise

_MASK31 = (1 << 31) - 1


def _mix(v: Tensor) -> Tensor:
    """A 31-bit integer hash (xorshift-multiply rounds); products stay below 2**63, so no overflow."""
    v = v & _MASK31
    v = ((v ^ (v >> 16)) * 0x45D9F3B) & _MASK31
    v = ((v ^ (v >> 15)) * 0x2C1B3C6D) & _MASK31
    v = ((v ^ (v >> 16)) * 0x297A2D39) & _MASK31
    return v ^ (v >> 15)


def seeded_normal(
    seed: int | Tensor, shape: tuple[Any, ...] | torch.Size, *, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal noise that is a pure function of ``seed`` (an int or int64 scalar tensor).

    A counter-based generator: element ``i`` hashes ``(seed, i)`` with integer ops and maps two
    hashed uniforms through Box-Muller. Because it is plain tensor code it runs inside exported
    programs and compiled graphs, where ``torch.Generator`` cannot go, and gives the same numbers
    eagerly, compiled and exported. Statistical quality is adequate for SmoothGrad-style noise
    (mean, variance and independence are tested), not for cryptography. Up to 2**30 elements.
    """
    seed_t = torch.as_tensor(seed, dtype=torch.long, device=device).reshape(())
    numel = math.prod(shape)
    i = torch.arange(numel, dtype=torch.long, device=seed_t.device)
    key = _mix(((seed_t & _MASK31) * 0x5BD1E995 + 0x1B873593) ^ _mix((seed_t >> 31) + 0x3C6EF372))
    u1 = (_mix((2 * i) ^ key).to(torch.float64) + 0.5) / 2.0**31
    u2 = (_mix((2 * i + 1) ^ _mix(key + 0x68E31DA4)).to(torch.float64) + 0.5) / 2.0**31
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(dtype).reshape(shape)


# ------------------------------------------------------------------------------ training


def value_and_attribution(
    attribute: Callable[..., TensorOrTuple],
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    **method_kwargs: Any,
) -> tuple[Tensor, TensorOrTuple]:
    """The model output and the attributions, from one forward pass, both differentiable w.r.t. ``params``.

    For a training step with an attribution loss: ``out, attr = value_and_attribution(...)``,
    then ``(task_loss(out) + lam * attr_loss(attr)).backward()`` (or the same under
    ``torch.func.grad`` w.r.t. ``params``). The output is the one the method computed at ``x``
    (so BatchNorm in training mode sees the batch once and updates its running statistics once,
    as a plain training step does); methods that never evaluate the model at ``x`` itself (IG
    with Gauss-Legendre nodes, SmoothGrad) add one forward for it.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> model_fn, params = ax.functionalize(net)
        >>> x = torch.randn(5, 3)
        >>> out, attr = ax.value_and_attribution(ax.input_x_gradient, model_fn, params, x, 1)
        >>> loss = torch.nn.functional.cross_entropy(out, torch.ones(5, dtype=torch.long)) + attr.pow(2).sum()
        >>> loss.backward()
        >>> net[0].weight.grad.shape
        torch.Size([4, 3])
    """
    _check_attribute(attribute)
    xs, _ = as_tuple(x)
    with training_call(xs) as call:
        attr = attribute(model_fn, params, x, target, **method_kwargs)
    if call.seen:
        return call.output, attr
    # one forward at x, with the arguments the method passed after it (additional_forward_args)
    extra = method_kwargs.get("additional_forward_args")
    return (model_fn if extra is None else bind_forward_args(model_fn, extra, x))(params, *xs), attr
