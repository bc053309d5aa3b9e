r"""The rewrite engine: trace a model once, then run it with substituted backward rules.

Rule-based methods (DeepLift, guided backprop, deconvnet, LRP, conditional
attribution) replace the backward pass of some operations. attrax does this in
one place:

1. **Trace.** ``program_for`` traces ``model_fn(params, *x)`` with
   ``make_fx(pre_dispatch=True)`` on fake tensors into an ATen graph at the
   level of ``aten.conv2d`` / ``aten.linear`` / ``aten.relu`` / ``aten.add``. Every
   call site is a node, so ``F.relu``, ``torch.relu``, ``x.relu()``, in-place
   ``relu_``, a module object called twice and residual adds all arrive as
   separate, canonical nodes. The graph is converted to a :class:`Program`:
   plain, immutable data (op names, encoded arguments, module paths), which
   ``torch.compile`` can unroll. Programs are batch-generic: the model is traced at
   two batch sizes and integer arguments that move with the batch (``view(B, -1)``)
   are stored as affine functions of it.
2. **Substitute.** A method maps every node to a rule (``substitute``); a node
   whose operation has no rule for that method is an error naming the op, the
   node and its module, raised before any tensor work.
3. **Run.** :func:`forward` evaluates the program with ordinary differentiable
   ops (one call per stream: input, reference). :func:`reverse` propagates a
   cotangent from the output back to the inputs, calling each node's rule.
   Everything is plain tensor code: second-order gradients, ``vmap``,
   ``torch.compile`` and export all see ordinary operations. See
   ``notes/rewrite.md`` for why this form rather than custom autograd Functions.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import keyword
import math
import operator
import random
import re
import sys
import threading
import weakref
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._decompose import DECOMPOSITIONS, FUSED_ATTENTION
from ._node import Node, _ntuple, _refs
from ._transpose import TRANSPOSES, t_max_pool
from .core import BoundModel, FunctionalModel, _cell_full, is_concrete, refuse_bound_in_compiled_code

__all__ = [
    "Node",
    "Site",
    "Streams",
    "substitute",
    "Program",
    "UnsupportedOperation",
    "exact_vjp",
    "forward",
    "program_for",
    "reverse",
]


class UnsupportedOperation(ValueError):
    """A node has no rule for the requested method, or the model cannot be traced."""


# --------------------------------------------------------------------------- data


#: ops whose output is >= 0 whatever the input
_ALWAYS_NONNEG = frozenset("relu relu6 sigmoid softplus exp abs square sqrt hardsigmoid".split())
#: ops whose output is >= 0 when every tensor argument is
_KEEPS_NONNEG = frozenset(
    """max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
    adaptive_avg_pool3d adaptive_max_pool2d mean sum add mul cat concat stack view _unsafe_view reshape flatten unflatten
    permute transpose t expand squeeze unsqueeze select slice narrow clone contiguous alias dropout _to_copy
    lift_fresh_copy constant_pad_nd getitem split chunk unbind maximum""".split()
)


def nonnegative(target: str, packet: str, args: tuple[Any, ...], nodes: Sequence[Node]) -> bool:
    """Static sign analysis: is this op's value >= 0 for every input?"""
    if packet in _ALWAYS_NONNEG:
        return True
    if packet not in _KEEPS_NONNEG:
        return False
    for e in args:
        for r in _refs((e,)):
            if not nodes[r].nonneg:
                return False
        if e[0] == "c" and isinstance(e[1], (int, float)) and not isinstance(e[1], bool) and e[1] < 0:
            return False  # a negative scalar operand (add/mul by a constant, pad value)
    return True


@dataclass(frozen=True)
class Program:
    """A traced model: nodes in topological order, and what they mean."""

    nodes: tuple[Node, ...]
    output: int
    n_inputs: int
    param_names: tuple[str, ...]
    constants: tuple[Tensor, ...] = ()
    batch: int | None = None  # the batch size a static program was traced at; None: generic

    def node_named(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def consumers(self) -> dict[int, list[int]]:
        users: dict[int, list[int]] = {n.index: [] for n in self.nodes}
        for n in self.nodes:
            for r in n.refs:
                users[r].append(n.index)
        return users


# ------------------------------------------------------------------------ tracing

_TRACE_BATCH_FALLBACK = (2, 3)
_UNSET = object()


def program_spec(model_fn: Callable[..., Tensor], params: Any, xs: Sequence[Tensor]) -> tuple[tuple[Any, ...], int | None]:
    """``(spec, batch)``: the hashable description of a call that a program is traced for."""
    batch = xs[0].shape[0]
    # Only the batch may be symbolic; other sizes are specialised (symbolic make_fx and
    # torch.compile(dynamic=True) make every dim a SymInt). operator.index specialises under both.
    ix = operator.index
    if torch.compiler.is_compiling():
        params_spec = tuple((k, tuple(ix(d) for d in v.shape), tuple(ix(d) for d in v.stride()), str(v.dtype),
                             str(v.device)) for k, v in params.items())
    else:  # the same, 4x faster (a transformer has hundreds of parameters)
        params_spec = tuple((k, tuple(map(ix, v.shape)), tuple(map(ix, v.stride())), _name_of(v.dtype), _name_of(v.device))
                            for k, v in params.items())
    spec = (
        params_spec,
        tuple((tuple(ix(d) for d in x.shape[1:]), str(x.dtype), str(x.device)) for x in xs),
        _training_flags(model_fn),
    )
    # Under torch.compile always the batch-generic program: dynamo cannot tell a symbolic batch
    # from a static one here (isinstance(b, SymInt) is False in traced code), and a generic
    # program is right for both, so a later recompile with a symbolic batch reuses it.
    if torch.compiler.is_compiling() and isinstance(model_fn, BoundModel) and model_fn.per_sample():
        return spec, operator.index(batch)  # per-sample arguments (bound by ax.compile) fix the batch
    if torch.compiler.is_compiling() or isinstance(batch, torch.SymInt):
        return spec, None
    return spec, int(batch)


def _name_of(v: Any) -> str:
    """``str(v)`` of a dtype or device, cached."""
    name = _NAMES.get(v)
    if name is None:
        name = _NAMES[v] = str(v)
    return name


_NAMES: dict[Any, str] = {}


def program_for(model_fn: Callable[..., Tensor], params: Any, xs: Sequence[Tensor],
                method: str = "this rule method") -> Program:
    """The traced program of ``model_fn`` for inputs like ``xs`` (memoised on ``FunctionalModel``); ``method``
    names the caller in errors."""
    refuse_bound_in_compiled_code(model_fn, method)
    spec, batch = program_spec(model_fn, params, xs)
    return _program(model_fn, spec, batch)


def _training_flags(model_fn: Any) -> tuple[bool, ...]:
    module = getattr(model_fn, "module", None)
    if module is None:
        return ()
    if isinstance(model_fn, FunctionalModel) and not torch.compiler.is_compiling():
        return model_fn.derived("training", lambda: tuple(m.training for m in module.modules()))
    return tuple(m.training for m in module.modules())


def trace_program(model_fn: Callable[..., Tensor], spec: tuple[Any, ...], batch: int | None,
                  fingerprint: Any = _UNSET, fused_attention: bool = False, native: bool = False) -> Program:
    """Trace (or fetch) the program.

    A concrete batch size gets a program traced at exactly that size, so Python
    branches on ``x.shape[0]`` are always taken as in eager mode. A symbolic batch
    (``torch.compile(dynamic=True)``, export) gets a batch-generic program, traced
    at two sizes with the integer arguments that move with the batch stored as
    affine functions of it. Memoised programs are keyed on the model's fingerprint
    (``FunctionalModel.fingerprint``), so a changed model is traced again; a caller that memoises
    more per call passes the fingerprint it computed once. ``fused_attention`` keeps
    ``scaled_dot_product_attention`` as one node (``_decompose.FUSED_ATTENTION``); only rules for it can use such a
    program (LRP's attention rule), so it is memoised apart. ``native``: no decomposition at all (normalisation,
    attention and ``addmm`` stay the fused ops the model calls), for :func:`gradient_program`.
    """
    if fingerprint is _UNSET:
        fingerprint = model_fn.fingerprint() if isinstance(model_fn, FunctionalModel) else None
    table = "native" if native else "fused_attention" if fused_attention else None
    key = (spec, batch) if table is None else (spec, batch, table)
    return memoised(model_fn, key, lambda: _trace_program(model_fn, spec, batch, fingerprint, table),
                    fingerprint=fingerprint)


def _trace_program(model_fn: Callable[..., Tensor], spec: tuple[Any, ...], batch: int | None,
                   fingerprint: Any, table: str | None = None) -> Program:
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    # The model's own trace is independent of any trace around this call (ax.export traces the whole
    # attribution): constants the model builds are real here, so they can be folded and compared.
    # the lock first: the mode stacks these contexts change are shared by the threads that trace
    with _TRACE_LOCK, unset_fake_temporarily(), disable_proxy_modes_tracing():
        return _trace_program_now(model_fn, spec, batch, fingerprint, table)


def _trace_program_now(model_fn: Callable[..., Tensor], spec: tuple[Any, ...], batch: int | None,
                       fingerprint: Any, name: str | None = None) -> Program:
    table = {"native": {}, "fused_attention": FUSED_ATTENTION, None: DECOMPOSITIONS}[name]
    with _TRACE_LOCK:  # make_fx and the fake-tensor machinery are not safe to enter from two threads at once
        if batch is not None:
            return replace(_build(_trace(model_fn, spec, batch, fingerprint, table), spec), batch=batch)
        sizes = _TRACE_BATCH_FALLBACK
        first = _build(_trace(model_fn, spec, sizes[0], fingerprint, table), spec)
        second = _build(_trace(model_fn, spec, sizes[1], fingerprint, table), spec)
    generic = _generalize(first, second, sizes)
    if generic is None:
        raise UnsupportedOperation(
            "model_fn's graph changes with the batch size, so it cannot be traced for a symbolic batch; "
            "call the method with a fixed batch size (torch.compile without dynamic=True)"
        )
    return generic


_TRACE_LOCK = threading.RLock()


def memoised(model_fn: Any, key: Any, compute: Callable[[], Any], fingerprint: Any = _UNSET) -> Any:
    """``compute()`` memoised on a ``FunctionalModel`` under ``key`` and the model's fingerprint
    (plain functions: not memoised). A changed model has another fingerprint, so nothing computed
    from an earlier state of it is ever returned."""
    cache = model_fn._programs if isinstance(model_fn, FunctionalModel) else None
    if cache is None:
        return compute()
    full = (model_fn.fingerprint() if fingerprint is _UNSET else fingerprint, key)
    with model_fn._lock:
        value = cache.get(full, _UNSET)
    if value is not _UNSET:
        return value
    value = compute()
    if isinstance(model_fn, FunctionalModel) and model_fn._fingerprint_now() != full[0]:
        return value  # the model changed while this was computed (another thread): for this call, not for the memo
    with model_fn._lock:
        return cache.setdefault(full, value)


#: marked constant so ``torch.compile`` runs tracing once, at trace time, outside the compiled region
_program = torch.compiler.assume_constant_result(trace_program)


def _trace(model_fn: Callable[..., Tensor], spec: tuple[Any, ...], batch: int, fingerprint: Any = None,
           table: Any = None) -> torch.fx.GraphModule:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    param_spec, input_spec, _ = spec
    # Tensors the model reads besides params and x (plain tensor attributes, buffers left out of
    # params, tensors a plain function closes over) are real: they become constants of the program,
    # read by reference, as torch.export lifts them.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        params = {
            k: torch.empty_strided(shape, stride, dtype=_DTYPES[dt], device=torch.device(dev))
            for k, shape, stride, dt, dev in param_spec
        }
        xs = [torch.empty((batch, *shape), dtype=_DTYPES[dt], device=torch.device(dev)) for shape, dt, dev in input_spec]

    module = getattr(model_fn, "module", None)
    if module is not None:
        # the private shadow of the module tree: the user's module never holds fake tensors, so
        # other threads calling it meanwhile are undisturbed
        shadow = model_fn.shadow(fingerprint)  # type: ignore[attr-defined]
        _check_hooks(shadow)
        bound = isinstance(model_fn, BoundModel)
        extra = model_fn.extra(batch) if bound else ()
        extra_kw = model_fn.extra_kwargs(batch) if bound else {}
        runner = model_fn.inner if bound else model_fn

        def fn(p: dict[str, Tensor], *x: Tensor) -> Tensor:
            return runner.run(shadow, p, (*x, *extra), extra_kw)  # type: ignore[union-attr]

        fn._orig_mod = shadow  # type: ignore[attr-defined]  # lets make_fx record module paths
    else:
        def fn(p: dict[str, Tensor], *x: Tensor) -> Tensor:
            return model_fn(p, *x)

    # The fake mode is not entered around the trace: only params and x are fake. Tensors the model
    # makes itself from constants (HF's attention masks, rotary tables) are real, so Python branches on
    # *their* values (`if torch.all(mask == 1)`) are taken as in eager mode, while a branch on a value
    # computed from x or params still fails (a fake tensor has no value) and is reported.
    def folded(p: dict[str, Tensor], *x: Tensor) -> Tensor:
        with _FoldConstants():
            return fn(p, *x)

    if module is not None:
        folded._orig_mod = fn._orig_mod  # type: ignore[attr-defined]

    try:
        # a trace draws nothing: the random states a forward may advance (torch's CPU generator, Python's and
        # numpy's) are as they were after it (a reviewer found a first gradient call's trace consumed the draw)
        roots = [shadow] if module is not None else _modules_read_by(getattr(model_fn, "fn", model_fn))
        with torch.enable_grad(), _random_states_kept(), _module_state_kept(roots, model_fn):
            return make_fx(folded, tracing_mode="real", pre_dispatch=True, record_module_stack=module is not None,
                           decomposition_table=DECOMPOSITIONS if table is None else table)(params, *xs)
    except UnsupportedOperation:
        raise
    except Exception as e:  # tracing failures surface as a clear argument error, with their cause
        raise UnsupportedOperation(_trace_failure(e, batch, input_spec)) from e


def _modules_read_by(fn: Any) -> list[nn.Module]:
    """The modules a plain function reads directly: in its closure, defaults, the globals it names, its ``self``."""
    target = getattr(fn, "__func__", fn)
    code = getattr(target, "__code__", None)
    values: list[Any] = [getattr(fn, "__self__", None), *(getattr(target, "__defaults__", None) or ())]
    values += [c.cell_contents for c in getattr(target, "__closure__", None) or () if _cell_full(c)]
    if code is not None:
        globs = getattr(target, "__globals__", {})
        values += [globs[n] for n in code.co_names if n in globs]
    if isinstance(fn, functools.partial):
        values += [*fn.args, *fn.keywords.values(), *_modules_read_by(fn.func)]
    return list({id(v): v for v in values if isinstance(v, nn.Module)}.values())


@contextlib.contextmanager
def _module_state_kept(roots: Sequence[nn.Module], model_fn: Any = None) -> Iterator[None]:
    """A trace writes nothing into the model: the attributes of every module of ``roots`` (the shadow, whose lists,
    dicts and sets are the user's own objects; the modules a plain function reads) are as they were after it, and
    so are the contents of the lists, dicts and sets among them. A forward that records its inputs
    (``self.seen.append(x)``) got the trace's fake tensors appended (found in review). Such a model is marked
    (``_writes_state`` on ``model_fn``): its eager calls write, so gradient methods keep running it as it is, not a
    program of it."""
    if not roots:
        yield
        return
    saved = []
    for m in {id(m): m for root in roots for m in root.modules()}.values():
        attrs = {k: v for k, v in m.__dict__.items() if k not in _MODULE_TABLES}
        contents = {k: copy.copy(v) for k, v in attrs.items() if type(v) in (list, dict, set)}
        saved.append((m, attrs, contents))
    try:
        yield
    finally:
        wrote = False
        for m, attrs, contents in saved:
            d = m.__dict__
            for k in [k for k in d if k not in attrs and k not in _MODULE_TABLES]:
                del d[k]
                wrote = True
            wrote = wrote or any(d.get(k) is not v for k, v in attrs.items())
            d.update(attrs)
            for k, c in contents.items():
                v = attrs[k]
                if isinstance(v, list):
                    changed = len(v) != len(c) or any(a is not b for a, b in zip(v, c))
                elif isinstance(v, dict):
                    changed = v.keys() != c.keys() or any(v[e] is not c[e] for e in c)
                else:
                    changed = v != c
                wrote = wrote or changed
                if changed and isinstance(v, list):
                    v[:] = c
                elif changed:
                    v.clear()
                    v.update(c)
        if wrote and isinstance(model_fn, FunctionalModel):
            model_fn.__dict__["_writes_state"] = True


#: a module's own tables of parameters, buffers and children (functional_call swaps their entries and puts them back)
_MODULE_TABLES = frozenset(("_parameters", "_buffers", "_modules"))


@contextlib.contextmanager
def _random_states_kept() -> Iterator[None]:
    py = random.getstate()
    np_state = None
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_state = np_random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py)
        if np_state is not None:
            np_random.set_state(np_state)  # type: ignore[union-attr]


class _FoldConstants(torch.overrides.TorchFunctionMode):
    """During a trace, compute what depends on neither x nor params eagerly, as constants.

    Models build tensors of their own from constants (HF's all-ones attention mask and the
    ``if torch.all(mask == 1)`` check on it, position ids, rotary tables). A torch call none of whose
    tensor arguments is fake (x and params are) runs for real, untraced; its result enters the
    program as a constant. So Python control flow on such values works as in eager mode, while any
    value computed from x or params stays traced (and branching on it is an error). Random
    functions are never folded: a constant would freeze their draw.
    """

    def __init__(self) -> None:
        super().__init__()
        # storages of real tensors that an in-place op wrote a traced value into (``z = zeros_like(h, dtype=...);
        # z += h``): their contents are no longer the constant's, so nothing reading them is folded (a reviewer
        # found ``z.to(dtype)`` folded from the zeros: the write lost, half the gradient)
        self.written: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _RANDOM.search(name) is None and not _touches_fake((args, kwargs)) and not self._reads_written((args, kwargs)):
            from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

            with torch._C.DisableTorchFunction(), disable_proxy_modes_tracing():
                return func(*args, **kwargs)
        if name in _SHAPE_ONLY and args and isinstance(args[0], Tensor) and not _touches_fake((args[1:], kwargs)):
            # x.new_zeros(...), zeros_like(x): only x's shape, dtype and device matter, so the result is a
            # real constant (Swin builds its shifted-window mask this way, then writes into it in place)
            from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

            like = args[0]
            with torch._C.DisableTorchFunction(), disable_proxy_modes_tracing():
                stand_in = torch.empty(tuple(like.shape), dtype=like.dtype, device=like.device)
                return func(stand_in, *args[1:], **kwargs)
        target = args[0] if args else None
        if (isinstance(target, Tensor) and not _touches_fake(target)
                and ((name.endswith("_") and not name.startswith("_")) or name in _SETTERS)):
            self.written.add(_storage_id(target))
        if _RANDOM.search(name) is None:
            return func(*args, **kwargs)
        # a trace draws nothing from the user's own generators either (torch's, Python's and numpy's default states
        # are kept by _random_states_kept): the program draws from them at every call
        generators = [v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Generator)]
        states = [g_.get_state() for g_ in generators]
        try:
            out = func(*args, **kwargs)
        finally:
            for g_, state in zip(generators, states):
                g_.set_state(state)
        # a draw is a value of this call only: what is computed from it is not folded either (``0.1 * randn``
        # folded into a constant froze the draw: DeepLift and LRP gave one answer for every seed)
        for v in torch.utils._pytree.tree_leaves(out):
            if isinstance(v, Tensor) and not _touches_fake(v):
                self.written.add(_storage_id(v))
        return out

    def _reads_written(self, tree: Any) -> bool:
        if not self.written:
            return False
        found = False

        def visit(v: Any) -> None:
            nonlocal found
            if isinstance(v, Tensor) and _storage_id(v) in self.written:
                found = True

        torch.utils._pytree.tree_map(visit, tree)
        return found


#: in-place writes by Python operators and item assignment (their names do not end with "_")
_SETTERS = frozenset("__setitem__ __iadd__ __isub__ __imul__ __itruediv__ __ifloordiv__ __imod__ __ipow__ __iand__ __ior__ __ixor__ __ilshift__ __irshift__".split())


def _storage_id(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


#: torch calls whose result depends on their first tensor argument's shape, dtype and device only
_SHAPE_ONLY = frozenset("new_zeros new_ones new_empty new_full zeros_like ones_like empty_like full_like".split())
_RANDOM = re.compile(r"rand|bernoulli|normal|dropout|multinomial|poisson|exponential|geometric|cauchy|uniform")


def _touches_fake(tree: Any) -> bool:
    """Any tensor argument that is not real: fake, or a torch.func wrapper around a fake tensor.

    Real tensors wrapped by a transform the model runs itself (HF builds masks under ``torch.vmap``)
    count as real: their values do not depend on x or params.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    functorch = torch._C._functorch
    for t in torch.utils._pytree.tree_leaves(tree):
        if not isinstance(t, Tensor):
            continue
        while functorch.is_functorch_wrapped_tensor(t):
            t = functorch.get_unwrapped(t)
        if isinstance(t, FakeTensor) or type(t) not in (Tensor, torch.nn.Parameter):
            return True
    return False


def _check_hooks(module: torch.nn.Module) -> None:
    """Refuse user forward hooks: a trace would call them with placeholder (fake) tensors."""
    from torch.nn.modules import module as _m

    found = [(f"module '{path}'" if path else "the root module", kind, h) for path, m in module.named_modules()
             for kind, d in (("forward hook", m._forward_hooks), ("forward pre-hook", m._forward_pre_hooks))
             for h in d.values() if not _torch_internal(h)]
    found += [("every module (a process-wide hook)", kind, h) for kind, d in (("forward hook", _m._global_forward_hooks),
              ("forward pre-hook", _m._global_forward_pre_hooks)) for h in d.values() if not _torch_internal(h)]
    if found:
        where, kind, h = found[0]
        raise UnsupportedOperation(
            f"{where} has a {kind} ({getattr(h, '__qualname__', type(h).__name__)}); rule-based methods "
            f"trace the model on placeholder tensors and would call the hook with them. Remove the hook while "
            f"attributing (handle.remove()), or use a gradient method, which calls the model on real tensors"
        )


def _torch_internal(hook: Any) -> bool:
    """Hooks torch installs itself (weight_norm, spectral_norm, ...) are part of the model's computation."""
    owner = getattr(hook, "__module__", None) or type(hook).__module__
    return owner.startswith("torch.")


def _trace_failure(e: Exception, batch: int, input_spec: Any) -> str:
    """Say why tracing failed and what to do, from the exception."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    cause = f"{type(e).__name__}: {text}"
    data_dependent = isinstance(e, GuardOnDataDependentSymNode) or any(
        s in str(e) for s in ("data-dependent", "data dependent", "DataDependentOutputException",
                              "aten._local_scalar_dense", ".item()", "Could not guard on data-dependent"))
    dynamic_shape = "DynamicOutputShapeException" in cause or type(e).__name__ == "DynamicOutputShapeException"
    if dynamic_shape:
        why = ("model_fn runs an op whose output shape depends on tensor values (nonzero, masked_select, unique: "
               "e.g. a mixture-of-experts layer routing tokens to experts by index); rule-based methods need one "
               "graph for all inputs, so such a model is explained with gradient or perturbation methods")
    elif data_dependent:
        why = ("model_fn branches on tensor values (Python control flow on .item(), bool(tensor) or nonzero); "
               "rule-based methods need one graph for all inputs: use torch.where/masking instead of a branch")
    else:
        shapes = ", ".join(f"({batch}, {', '.join(map(str, s))})" for s, _, _ in input_spec)
        why = (f"rule-based methods trace model_fn(params, x) on placeholder tensors of x's shape [{shapes}] and "
               f"it failed there; check that model_fn runs on a batch of that shape (x needs its batch dimension "
               f"first) and on these params")
    return f"could not trace model_fn into a graph for rule-based attribution ({cause}); {why}"


_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32,
                               torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}

# ops whose output aliases their first argument (for the in-place-into-a-view check)
_VIEW_OPS = frozenset(
    "view _unsafe_view reshape select slice narrow transpose t permute expand expand_as unsqueeze squeeze as_strided "
    "diagonal unfold alias split split_with_sizes chunk unbind flatten unflatten view_as detach real imag".split()
)
#: ops whose value does not depend on their tensor arguments' values (only shapes, dtypes): never input-dependent
_VALUE_FREE = frozenset("detach new_zeros new_ones new_empty new_full zeros_like ones_like empty_like full_like "
                        "sym_size sym_numel sym_stride".split())


def packet_of(name: str) -> str:
    """``"conv2d"`` for ``"aten.conv2d.default"``; other names unchanged."""
    return name.split(".")[1] if name.startswith("aten.") else name


_AUTOCAST = (torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast)
_SKIP_TARGETS = ("_assert_tensor_metadata", "_assert_async", "sym_constrain_range", "_assert_scalar")


def _build(gm: torch.fx.GraphModule, spec: tuple[Any, ...]) -> Program:
    """Convert a traced graph to a Program."""
    from torch._subclasses.fake_tensor import FakeTensor

    param_names = tuple(p[0] for p in spec[0])
    n_inputs = len(spec[1])
    index: dict[torch.fx.Node, int] = {}
    nodes: list[Node] = []
    constants: list[Tensor] = []
    placeholders = 0
    grad_enabled = True
    output = -1
    alias_root: dict[int, int] = {}

    def enc(a: Any) -> Any:
        return _encode(a, index, gm, constants, nodes)

    _drop_transform_residue(gm)
    for fx_node in gm.graph.nodes:
        i = len(nodes)
        if fx_node.op == "placeholder":
            if placeholders < len(param_names):
                nodes.append(Node(i, "param", param_names[placeholders], name=fx_node.name, float_out=True))
            else:
                k = placeholders - len(param_names)
                nodes.append(Node(i, "input", str(k), name=fx_node.name, dep=True, shape=_shape(fx_node)))
            placeholders += 1
            index[fx_node] = i
            alias_root[i] = i
            continue
        if fx_node.op == "get_attr":
            value = _constant_value(getattr(gm, fx_node.target))
            if isinstance(value, FakeTensor):
                users = ", ".join(f"'{u.name}'" for u in fx_node.users) or f"'{fx_node.name}'"
                raise UnsupportedOperation(
                    f"a value model_fn computes from x or params reached the traced graph as a constant (node "
                    f"{users}): the tracer lost how it was computed (a torch.func transform or other code the "
                    f"model runs outside torch's ops); rule-based methods cannot explain through it. Attribute "
                    f"with a gradient method"
                )
            if _in_transform(value):
                users = ", ".join(f"'{u.name}'" for u in fx_node.users) or f"'{fx_node.name}'"
                what = ("runs torch.vmap (or another torch.func transform) over values computed from x or params"
                        if _touches_fake([value]) else
                        "runs torch.vmap (or another torch.func transform) itself, and a value batched by it is used "
                        "by the computation on x or params")
                raise UnsupportedOperation(
                    f"model_fn {what} (node {users}); the traced program has no such transform, so it cannot keep "
                    f"that value. Apply the transform outside the model, or attribute with a gradient method"
                )
            constants.append(value)
            nodes.append(Node(i, "const", str(len(constants) - 1), name=fx_node.name))
            index[fx_node] = i
            alias_root[i] = i
            continue
        if fx_node.op == "output":
            outs = fx_node.args[0]
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            if len(outs) != 1 or not isinstance(outs[0], torch.fx.Node):
                raise UnsupportedOperation(f"model_fn must return a single tensor of shape (B, ...), got {len(outs)} outputs")
            output = index[outs[0]]
            continue
        # call_function
        target = fx_node.target
        if target is torch._C._set_grad_enabled:
            grad_enabled = bool(fx_node.args[0])
            continue
        if target in _AUTOCAST:
            if target is torch.amp.autocast_mode._enter_autocast and len(fx_node.args) > 2 and fx_node.args[2]:
                raise UnsupportedOperation(
                    f"model_fn enters torch.autocast (node '{fx_node.name}'); rule-based methods run the model in "
                    f"its own dtypes: call it without autocast, in the dtype you want explained")
            continue  # autocast(enabled=False) regions (HF's rotary embeddings) change nothing
        name = _target_name(target)
        if any(s in name for s in _SKIP_TARGETS):
            continue
        inplace = False
        if name.startswith("aten.") and name.split(".")[1].endswith("_") and not name.split(".")[1].startswith("_"):
            inplace = True
            name = _functional_variant(name, fx_node)
            src = fx_node.args[0]
            if isinstance(src, torch.fx.Node):
                _check_inplace(fx_node, index[src], alias_root, gm, index)
        out_kw = isinstance(fx_node.target, torch._ops.OpOverload) and "out" in fx_node.kwargs
        if out_kw:  # torch.div(a, b, out=t) (spectral_norm's power iteration into its buffers): the op without
            # out=, which make_fx already points later reads of t at; writing into t wrote into the user's buffer
            inplace = True
            name = _out_free_variant(name, fx_node)
        args = tuple(enc(a) for a in fx_node.args)
        kwargs = tuple((k, enc(v)) for k, v in fx_node.kwargs.items() if not (out_kw and k == "out"))
        if name == "aten.batch_norm.default" and len(args) > 5 and args[5] == ("c", True):
            # training mode: batch statistics, and no write into the running-stat buffers (API §1)
            args = (*args[:3], ("c", None), ("c", None), *args[5:])
        if name == "aten.dropout.default" and len(args) > 2 and args[2] == ("c", True) and args[0][0] == "n":
            # training mode: the random mask as a node of its own that does not depend on x's values,
            # drawn once per forward and shared by every stream and backward rule, then x * mask
            # (linear): a rule never redraws it
            src = args[0]
            ones = len(nodes)
            nodes.append(Node(ones, "call", "aten.ones_like.default", (src,), (), f"{fx_node.name}_ones",
                              refs=(src[1],), dep_refs=(False,), packet="ones_like"))
            nodes.append(Node(ones + 1, "call", name, (("n", ones), *args[1:]), (), f"{fx_node.name}_mask",
                              refs=(ones,), dep_refs=(False,), packet="dropout", nonneg=True))
            i = len(nodes)
            name, args, kwargs = "aten.mul.Tensor", (src, ("n", ones + 1)), ()
        refs = tuple(dict.fromkeys(_refs(args) + _refs(tuple(v for _, v in kwargs))))
        float_out = _is_float(fx_node)
        dep = grad_enabled and any(nodes[r].dep for r in refs) and packet_of(name) not in _VALUE_FREE
        dep_refs = tuple(nodes[r].dep and nodes[r].float_out for r in refs)
        module, module_type = _module_of(fx_node)
        layer = _layer_of(args, nodes) or module
        packet = name.split(".")[1] if name.startswith("aten.") else name
        nodes.append(
            Node(i, "call", name, args, kwargs, fx_node.name, module, module_type, layer, dep, refs, dep_refs,
                 float_out, _shape(fx_node), packet, nonnegative(name, packet, args, nodes),
                 stack=_stack_of(fx_node))
        )
        index[fx_node] = i
        cast = _inplace_dtype(fx_node) if inplace else None
        if cast is not None:  # a.add_(b) keeps a's dtype where add(a, b) promotes: cast back, as the op wrote into a
            i = len(nodes)
            nodes.append(replace(nodes[-1], index=i, target="aten._to_copy.default", packet="_to_copy",
                                 args=(("n", i - 1),), kwargs=(("dtype", ("dt", str(cast))),), name=f"{fx_node.name}_cast",
                                 refs=(i - 1,), dep_refs=(nodes[-1].dep and nodes[-1].float_out,),
                                 nonneg=nodes[-1].nonneg))
            index[fx_node] = i
        first = fx_node.args[0] if fx_node.args else None
        if (packet in _VIEW_OPS or packet == "getitem") and isinstance(first, torch.fx.Node) and first in index:
            alias_root[i] = alias_root[index[first]]
        else:
            alias_root[i] = i
    if output < 0:
        raise UnsupportedOperation("model_fn's traced graph has no output")
    if not nodes[output].dep:
        raise UnsupportedOperation("model_fn's output does not depend on its input x")
    return Program(tuple(nodes), output, n_inputs, param_names, tuple(constants))


def _constant_value(value: Any) -> Any:
    """A traced constant's value. One the model built under an enclosing ``torch.func.grad`` is
    wrapped by it: its value does not depend on params or x, so the plain tensor inside is the constant."""
    functorch = torch._C._functorch
    while isinstance(value, Tensor) and functorch.is_gradtrackingtensor(value):
        value = functorch.get_unwrapped(value)
    return value


def _in_transform(value: Any) -> bool:
    """A tensor still wrapped by a torch.func transform (a ``vmap`` level) the model ran itself."""
    return isinstance(value, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(value)


def _drop_transform_residue(gm: torch.fx.GraphModule) -> None:
    """Erase the dead nodes the tracer records inside a ``torch.vmap`` the model runs on constants.

    HF transformers builds the 4-D attention mask from the 2-D one under nested ``torch.vmap`` calls.
    Every torch call in there has only real arguments, so ``_FoldConstants`` runs it eagerly and the
    mask arrives as an ordinary constant. But leaving each vmap level, functorch itself (C++, no torch
    function) expands an output that level did not batch, and the pre-dispatch tracer records that
    ``expand`` on the still-batched value as a node whose constant is a dead functorch wrapper. No
    value the model goes on to use comes from it (later calls on the mask are folded too), so such
    nodes are dead and computed from constants alone: erasing them changes nothing the program
    computes. A batched constant that wraps a value of x or params, or whose nodes are live or meet
    x or params, is kept, for ``_build`` to refuse.
    """
    traced: set[torch.fx.Node] = set()  # nodes computed from x or params
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in traced for a in n.all_input_nodes):
            traced.add(n)
    for const in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        value = _constant_value(getattr(gm, const.target, None))
        if not _in_transform(value) or _touches_fake([value]):
            continue  # a plain constant, or one that depends on x or params: not residue
        reach, todo = {const}, [const]
        while todo:
            for user in todo.pop().users:
                if user not in reach:
                    reach.add(user)
                    todo.append(user)
        if any(n.op != "call_function" or _mutates(n) or n in traced for n in reach - {const}):
            # live (used by the output, or writing in place), or meeting x or params (the vmap's output
            # of a computation on x or params reached the graph as a constant): no residue, refused below
            continue
        for n in reversed(list(gm.graph.nodes)):
            if n in reach:
                gm.graph.erase_node(n)


def _mutates(fx_node: torch.fx.Node) -> bool:
    """Whether a node may have an effect besides its output (writes in place; any call but an ATen op)."""
    target = fx_node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    return not isinstance(target, torch._ops.OpOverloadPacket) and target is not operator.getitem


def _check_inplace(fx_node: torch.fx.Node, mutated: int, alias_root: dict[int, int], gm: torch.fx.GraphModule,
                   index: dict[torch.fx.Node, int]) -> None:
    """An in-place op is rewritten out of place; refuse when that would drop a write into a view."""
    root = alias_root.get(mutated, mutated)
    if root == mutated:
        return
    order = list(gm.graph.nodes)
    later = any(
        alias_root.get(index[arg], index[arg]) == root
        for user in order[order.index(fx_node) + 1 :]
        for arg in user.all_input_nodes
        if arg in index
    )
    if later:
        raise UnsupportedOperation(
            f"{fx_node.target} at node '{fx_node.name}' writes in place into a view of another tensor that is used "
            f"afterwards (e.g. `h[:, 0] = v`); rule-based methods need the write out of place (e.g. torch.cat/where)"
        )


def _inplace_dtype(fx_node: torch.fx.Node) -> torch.dtype | None:
    """The dtype an in-place op kept (its first operand's) where the out-of-place op would promote to another, else
    None: ``z += h`` on a float32 ``z`` and a float64 ``h`` stays float32."""
    val = fx_node.meta.get("val")
    if not isinstance(val, Tensor) or len(fx_node.args) < 2:
        return None
    operands = []
    for a in fx_node.args[:2]:
        v = a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        if isinstance(v, Tensor):  # a stand-in of its dtype and rank (promotion reads only these)
            operands.append(torch.empty((1,) * v.dim(), dtype=v.dtype))
        elif isinstance(v, (bool, int, float, complex)):
            operands.append(v)
        else:
            return None
    try:
        promoted = torch.result_type(*operands)
    except (RuntimeError, TypeError):
        return None
    return val.dtype if promoted != val.dtype else None


def _functional_variant(name: str, fx_node: torch.fx.Node) -> str:
    _, packet, overload = name.split(".")
    base = packet[:-1]
    ns = torch.ops.aten
    if hasattr(ns, base) and overload in getattr(ns, base).overloads():
        return f"aten.{base}.{overload}"
    raise UnsupportedOperation(f"in-place {name} at node '{fx_node.name}' has no out-of-place equivalent")


def _out_free_variant(name: str, fx_node: torch.fx.Node) -> str:
    """The overload of an ``out=`` op's packet that takes the same arguments without ``out`` and returns a new
    tensor (``aten.div.out`` -> ``aten.div.Tensor``)."""
    packet = name.split(".")[1]
    want = [a.name for a in fx_node.target._schema.arguments if not a.is_out]
    op = getattr(torch.ops.aten, packet, None)
    for overload in op.overloads() if op is not None else ():
        schema = getattr(op, overload)._schema
        if not schema.is_mutable and [a.name for a in schema.arguments] == want:
            return f"aten.{packet}.{overload}"
    raise UnsupportedOperation(f"{name} at node '{fx_node.name}' writes into an out= tensor and has no equivalent "
                               f"that returns a new one")


def _target_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else f"{target.namespace}.{target.__name__}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"aten.{target.__name__}.default"
    raise UnsupportedOperation(f"unsupported call {getattr(target, '__name__', target)!r} in the traced graph")


def _encode(a: Any, index: dict[torch.fx.Node, int], gm: torch.fx.GraphModule, constants: list[Tensor],
            nodes: list[Node]) -> Any:
    if isinstance(a, torch.fx.Node):
        return ("n", index[a])
    if isinstance(a, (list, tuple)):
        items = tuple(_encode(v, index, gm, constants, nodes) for v in a)
        return ("l", items) if isinstance(a, list) else ("t", items)
    if isinstance(a, torch.dtype):
        return ("dt", str(a))
    if isinstance(a, torch.device):
        return ("dev", str(a))
    if isinstance(a, torch.layout):
        return ("lay", str(a).replace("torch.", ""))
    if isinstance(a, torch.memory_format):
        return ("mf", str(a).replace("torch.", ""))
    if isinstance(a, Tensor):
        constants.append(a)
        return ("k", len(constants) - 1)
    if a is None or isinstance(a, (bool, int, float, str)):
        return ("c", a)
    raise UnsupportedOperation(f"unsupported argument {a!r} of type {type(a).__name__} in the traced graph")


def _is_float(fx_node: torch.fx.Node) -> bool:
    val = fx_node.meta.get("val")
    if isinstance(val, Tensor):
        return val.is_floating_point()
    if isinstance(val, (list, tuple)):
        return any(isinstance(v, Tensor) and v.is_floating_point() for v in val)
    return False


def _shape(fx_node: torch.fx.Node) -> tuple[int, ...] | None:
    val = fx_node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, Tensor) else None


def _module_of(fx_node: torch.fx.Node) -> tuple[str | None, str | None]:
    stack = fx_node.meta.get("nn_module_stack")
    if not stack:
        return None, None
    path, typ = list(stack.values())[-1]
    if not path:
        return None, None
    type_name = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
    return path, type_name


def _stack_of(fx_node: torch.fx.Node) -> tuple[tuple[str, str], ...]:
    """``(call key, module path)`` of every enclosing module call; repeated calls have keys ``path@k``."""
    stack = fx_node.meta.get("nn_module_stack") or {}
    return tuple((str(key), str(value[0])) for key, value in stack.items() if value[0])


def _layer_of(args: tuple[Any, ...], nodes: list[Node]) -> str | None:
    """The module path owning the weight of a weighted op (``features.0`` for ``features.0.weight``)."""
    for r in _refs(args):
        n = nodes[r]
        if n.op == "param" and n.target.endswith(".weight"):
            return n.target[: -len(".weight")]
    return None


# ------------------------------------------------------------------- generalization


def _generalize(a: Program, b: Program, sizes: tuple[int, int]) -> Program | None:
    """Merge two traces at different batch sizes into one batch-generic program, or None."""
    if len(a.nodes) != len(b.nodes) or a.output != b.output or len(a.constants) != len(b.constants):
        return None
    nodes = []
    for na, nb in zip(a.nodes, b.nodes):
        if (na.op, na.target, na.refs) != (nb.op, nb.target, nb.refs):
            return None
        args = _merge(na.args, nb.args, sizes)
        kwargs = _merge(na.kwargs, nb.kwargs, sizes)
        if args is _FAIL or kwargs is _FAIL:
            return None
        shape = None
        if na.shape is not None and nb.shape is not None and len(na.shape) == len(nb.shape):
            shape = tuple(-1 if sa != sb else sa for sa, sb in zip(na.shape, nb.shape))
        nodes.append(replace(na, args=args, kwargs=kwargs, shape=shape))
    constants = list(a.constants)
    per_batch: set[int] = set()
    for i, (ca, cb) in enumerate(zip(a.constants, b.constants)):
        if ca.shape == cb.shape and torch.equal(ca, cb):
            continue
        # a constant with one row per sample, every row alike (a mask the model expands to the batch):
        # keep one row, expanded to the batch where it is used
        if (ca.ndim and ca.shape[0] == sizes[0] and cb.shape[0] == sizes[1] and ca.shape[1:] == cb.shape[1:]
                and torch.equal(ca, ca[:1].expand_as(ca)) and torch.equal(cb, ca[:1].expand_as(cb))):
            constants[i] = ca[:1]
            per_batch.add(i)
            continue
        return None
    if per_batch:
        nodes = [replace(n, args=_batch_constants(n.args, per_batch),
                         kwargs=tuple((k, _batch_constants((v,), per_batch)[0]) for k, v in n.kwargs)) for n in nodes]
    return replace(a, nodes=tuple(nodes), constants=tuple(constants), batch=None)


def _batch_constants(encoded: tuple[Any, ...], which: set[int]) -> tuple[Any, ...]:
    """Re-tag references to the constants in ``which`` as expanded to the batch (``("kb", i)``)."""

    def one(e: Any) -> Any:
        if e[0] == "k" and e[1] in which:
            return ("kb", e[1])
        if e[0] in ("l", "t"):
            return (e[0], tuple(one(v) for v in e[1]))
        return e

    return tuple(one(e) for e in encoded)


_FAIL = object()


def _merge(ea: Any, eb: Any, sizes: tuple[int, int]) -> Any:
    """Merge two encoded argument sequences, or kwargs pair sequences, element by element."""
    if ea == eb:
        return ea
    if len(ea) != len(eb):
        return _FAIL
    items = []
    for x, y in zip(ea, eb):
        if isinstance(x[0], str) and x[0] not in _TAGS:  # a (key, encoding) kwargs pair
            if x[0] != y[0]:
                return _FAIL
            m = _merge_one(x[1], y[1], sizes)
            items.append(_FAIL if m is _FAIL else (x[0], m))
        else:
            items.append(_merge_one(x, y, sizes))
    return _FAIL if any(i is _FAIL for i in items) else tuple(items)


_TAGS = frozenset(("n", "c", "l", "t", "b", "dt", "dev", "lay", "mf", "k", "kb"))


def _merge_one(ea: Any, eb: Any, sizes: tuple[int, int]) -> Any:
    if ea == eb:
        return ea
    if ea[0] != eb[0]:
        return _FAIL
    if ea[0] == "c" and type(ea[1]) is int and type(eb[1]) is int:
        (b1, b2), (v1, v2) = sizes, (ea[1], eb[1])
        slope, rem = divmod(v2 - v1, b2 - b1)
        return _FAIL if rem else ("b", slope, v1 - slope * b1)
    if ea[0] in ("l", "t") and len(ea[1]) == len(eb[1]):
        items = tuple(_merge_one(x, y, sizes) for x, y in zip(ea[1], eb[1]))
        return _FAIL if any(i is _FAIL for i in items) else (ea[0], items)
    return _FAIL


# ------------------------------------------------------------------------ running


def aten_op(name: str) -> Any:
    """The callable for an op name like ``"aten.conv2d.default"``."""
    ns, packet, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), packet), overload)


def decode(e: Any, env: Sequence[Any], batch: Any, constants: tuple[Tensor, ...]) -> Any:
    tag = e[0]
    if tag == "n":
        return env[e[1]]
    if tag == "c":
        return e[1]
    if tag == "l":
        return [decode(v, env, batch, constants) for v in e[1]]
    if tag == "t":
        return tuple(decode(v, env, batch, constants) for v in e[1])
    if tag == "b":
        return e[1] * batch + e[2]
    if tag == "dt":
        return _DTYPES[e[1]]
    if tag == "dev":
        return torch.device(e[1])
    if tag == "lay":
        return getattr(torch, e[1])
    if tag == "mf":
        return getattr(torch, e[1])
    if tag == "k":
        return constants[e[1]]
    if tag == "kb":
        c = constants[e[1]]
        return c.expand(batch, *c.shape[1:])
    raise AssertionError(f"bad encoding {e!r}")


def call_args(program: Program, node: Node, env: Sequence[Any], batch: Any) -> tuple[list[Any], dict[str, Any]]:
    """A call node's decoded ``(args, kwargs)`` at the values in ``env``."""
    if not torch.compiler.is_compiling():
        return _straight(program).builders[node.index](env, batch)
    c = program.constants
    return [decode(a, env, batch, c) for a in node.args], {k: decode(v, env, batch, c) for k, v in node.kwargs}


def run_node(program: Program, node: Node, env: Sequence[Any], batch: Any) -> Any:
    args, kwargs = call_args(program, node, env, batch)
    if node.target == "getitem":
        return args[0][args[1]]
    return aten_op(node.target)(*args, **kwargs)


_SDPA = "aten.scaled_dot_product_attention.default"


def _transformed_call(node: Node, env: Sequence[Any]) -> bool:
    """A node's tensor arguments are differentiated, batched (torch.func transforms, autograd) or under
    torch.compile: no vjp taken in the forward (the fused kernels have neither double backward nor a vmap
    rule for their backward)."""
    if torch.compiler.is_compiling():
        return True
    for r in node.refs:
        v = env[r]
        if isinstance(v, Tensor) and (v.requires_grad or is_functorch_wrapped_tensor(v)):
            return True
    return False


_POOL_WITH_INDICES = {
    "aten.max_pool2d.default": (torch.ops.aten.max_pool2d_with_indices.default, 2),
    "aten.max_pool3d.default": (torch.ops.aten.max_pool3d_with_indices.default, 3),
}


def forward(
    program: Program,
    params: Any,
    xs: Sequence[Tensor],
    shared: Sequence[Any] | None = None,
    aux: dict[int, Any] | None = None,
    drop: Sequence[Sequence[int]] | None = None,
    only: Container[int] | None = None,
) -> list[Any]:
    """Evaluate every node with ordinary ops; returns the list of node values.

    With ``drop``, the values listed at ``drop[k]`` (``(index, shape_only)`` pairs) are released once node
    ``k`` has run: values no later node reads and the reverse pass reads at most the shape of (a caller's
    liveness analysis), so they are not all alive at once. A released value is None, or with
    ``shape_only`` a stand-in of its shape, dtype and device that holds no memory (a zero-stride expand).
    With ``only``, just the nodes it holds are evaluated (it must hold what they are computed from); the
    others stay None.

    With ``shared`` (the values of another stream of the same program), nodes
    that do not depend on the input are taken from it instead of recomputed.
    With ``aux``, max-pooling nodes also record their argmax indices there (the
    kernel computes them anyway), so backward rules need not pool again.
    """
    if program.batch is not None and xs[0].shape[0] != program.batch:
        raise AssertionError("static program run at a different batch size")
    batch = xs[0].shape[0]
    if only is None and not torch.compiler.is_compiling():  # the same steps as straight-line code
        code = _straight(program)
        for name in code.param_names:
            if name not in params:
                raise ValueError(f"params is missing '{name}', which model_fn uses")
        run = code.forward(aux is not None, shared is not None, drop)
        return run([None] * len(program.nodes), params, xs, shared, aux, batch)
    env: list[Any] = [None] * len(program.nodes)
    for node in program.nodes:
        i = node.index
        if only is not None and i not in only:
            continue
        if shared is not None and not node.dep:
            env[i] = shared[i]
        elif node.op == "call":
            pool = _POOL_WITH_INDICES.get(node.target) if aux is not None else None
            if pool is not None and not node.kwargs:
                args, _ = call_args(program, node, env, batch)
                env[i], aux[i] = pool[0](*pool_params(args, pool[1], with_input=True))
            elif aux is not None and node.target == _SDPA and node.dep:
                env[i] = _attention_with_vjp(node, env, aux, *call_args(program, node, env, batch))
            else:
                env[i] = run_node(program, node, env, batch)
        elif node.op == "param":
            try:
                env[i] = params[node.target]
            except KeyError:
                raise ValueError(f"params is missing '{node.target}', which model_fn uses") from None
        elif node.op == "input":
            env[i] = xs[int(node.target)]
        elif node.op == "const":
            env[i] = program.constants[int(node.target)]
        if drop is not None:
            for j, shape_only in drop[i]:
                env[j] = _standin(env[j]) if shape_only else None
    return env


def _attention_with_vjp(node: Node, env: Sequence[Any], aux: dict[int, Any], args: list[Any], kwargs: dict[str, Any]
                        ) -> Any:
    """An attention node's value; where its call is not transformed, with its vjp stored in ``aux`` (attention
    kept fused: the vjp is taken with the forward, from the kernel's saved statistics, so the reverse rule does
    not run the kernel's forward again)."""
    op = aten_op(node.target)
    if _transformed_call(node, env):
        return op(*args, **kwargs)
    if torch.is_inference_mode_enabled():
        out, aux[node.index] = torch.func.vjp(lambda q, k, v: op(q, k, v, *args[3:], **kwargs), *args[:3])
        return out
    flash = _flash_call(args, kwargs)
    if flash is not None:
        return _flash_with_vjp(node, aux, *flash)
    # plain autograd on detached leaves (the call is not transformed): what torch.func.vjp does, without its
    # per-call wrapping (~150 us a node); the graph is kept for repeated pulls (one forward, several backwards)
    with torch.enable_grad():
        qkv = tuple(a.detach().requires_grad_() for a in args[:3])
        out = op(*qkv, *args[3:], **kwargs)
    aux[node.index] = lambda g: torch.autograd.grad(out, qkv, g, retain_graph=True)
    return out.detach()


def _flash_call(args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """``(q, k, v, is_causal, attn_mask, scale)`` where ``scaled_dot_product_attention`` runs the CPU flash kernel
    (its choice on CPU, ``select_sdp_backend_cpp``: dense 4-d q/k/v of one float dtype with equal batch, heads
    and head dims, unit last stride, no dropout, a float mask of their dtype or none, flash enabled),
    else None. Called directly, the kernel's own backward is the vjp: no autograd graph (~100 us a node)."""
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    extra = dict(zip(names, args[3:]))
    if len(args) > 8 or set(extra) & set(kwargs) or set(kwargs) - set(names):
        return None
    extra.update(kwargs)
    q, k, v = args[:3]
    mask, causal, scale = extra.get("attn_mask"), extra.get("is_causal", False), extra.get("scale")
    if extra.get("dropout_p", 0.0) or not isinstance(causal, bool):  # enable_gqa: a no-op at equal head counts
        return None
    if not all(type(t) is Tensor and t.device.type == "cpu" and t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v)):
        return None
    if (q.dtype not in (torch.float32, torch.float64, torch.bfloat16) or not q.dtype == k.dtype == v.dtype
            or not q.shape[:2] == k.shape[:2] == v.shape[:2] or not q.shape[-1] == k.shape[-1] == v.shape[-1]
            or 0 in q.shape or 0 in k.shape or not torch.backends.cuda.flash_sdp_enabled()):
        return None
    if mask is not None and not (type(mask) is Tensor and mask.dtype == q.dtype and mask.dim() in (2, 4) and not causal):
        return None  # the kernel takes 2-d and 4-d masks only (SDPA's other paths broadcast a 3-d one)
    if scale is not None and not isinstance(scale, float):
        return None
    return q, k, v, causal, mask, scale


def _flash_with_vjp(node: Node, aux: dict[int, Any], q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Any,
                    scale: Any) -> Tensor:
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    out, lse = fwd(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    aux[node.index] = lambda g: bwd(g, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    return out


def plain_eager(*ts: Tensor) -> bool:
    """Plain eager tensors: not compiled, traced (a dispatch mode), transformed (functorch) or differentiated,
    and no subclass. Only for those may a value be cached across calls or a kernel write with ``out=``."""
    return not (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None) and all(
        type(t) is Tensor and not t.requires_grad and not is_functorch_wrapped_tensor(t) for t in ts)


def _standin(v: Any) -> Any:
    """A released value's stand-in: its shape, dtype and device, no memory (a zero-stride expand of a zero)."""
    if not isinstance(v, Tensor):
        return None
    if not plain_eager(v):  # transformed or traced: an op of the program
        return v.new_zeros(()).expand(v.shape)
    key = (v.shape, v.dtype, v.device)
    hit = _STANDINS.get(key)
    if hit is None:
        if len(_STANDINS) > 4096:
            _STANDINS.clear()
        hit = _STANDINS[key] = v.new_zeros(()).expand(v.shape)
    return hit


#: stand-ins by (shape, dtype, device), shared across calls (they hold one element each, and nothing reads
#: more than their shape)
_STANDINS: dict[Any, Tensor] = {}


# ------------------------------------------------------------ straight-line code

class _Straight:
    """A program as generated Python: per call node a function ``(env, batch) -> (args, kwargs)`` with every
    encoded argument resolved at generation (constants bound, ``env`` slots indexed by literal), and the
    forward pass as one function per mode. Same ops, same order as the interpreter; what goes is the per-node
    decoding and dispatch in Python (about 15 us a node: a transformer's few hundred nodes cost as much as
    its matrix products at small sizes). Not used under ``torch.compile`` (dynamo unrolls the interpreter)."""

    def __init__(self, program: Program) -> None:
        self.program = weakref.ref(program)
        self.param_names = tuple(dict.fromkeys(n.target for n in program.nodes if n.op == "param"))
        self.ns: dict[str, Any] = {"_pool_params": pool_params, "_standin": _standin, "_attention": _attention_with_vjp}
        self._forwards: dict[Any, Any] = {}
        self.derived: dict[str, Any] = {}  # per_program's answers (consumable nodes, reverse order, ...)
        lines = []
        for node in program.nodes:
            if node.op == "call":
                args = ", ".join(self.expr(a) for a in node.args)
                kwargs = ", ".join(f"{k!r}: {self.expr(v)}" for k, v in node.kwargs)
                lines.append(f"def b{node.index}(e, B):\n    return [{args}], {{{kwargs}}}")
        self.builders: list[Any] = [None] * len(program.nodes)
        if lines:
            exec(compile("\n".join(lines), f"<attrax program {id(program):x} arguments>", "exec"), self.ns)
            for node in program.nodes:
                if node.op == "call":
                    self.builders[node.index] = self.ns[f"b{node.index}"]

    def bind(self, value: Any) -> str:
        name = f"K{len(self.ns)}"
        self.ns[name] = value
        return name

    def expr(self, e: Any) -> str:
        """Python source that evaluates the encoded argument ``e`` (``e``: the env list, ``B``: the batch)."""
        tag = e[0]
        if tag == "n":
            return f"e[{e[1]}]"
        if tag == "c":
            v = e[1]
            if v is None or type(v) in (bool, int, str) or (type(v) is float and math.isfinite(v)):
                return repr(v)
            return self.bind(v)
        if tag == "l":
            return "[" + ", ".join(self.expr(v) for v in e[1]) + "]"
        if tag == "t":
            return "(" + "".join(self.expr(v) + ", " for v in e[1]) + ")"
        if tag == "b":
            return f"({e[1]!r} * B + {e[2]!r})"
        if tag in ("dt", "dev", "lay", "mf"):
            return self.bind(decode(e, (), None, ()))
        program = self.program()
        assert program is not None
        if tag == "k":
            return self.bind(program.constants[e[1]])
        if tag == "kb":
            c = program.constants[e[1]]
            return f"{self.bind(c)}.expand(B, *{tuple(c.shape[1:])!r})"
        raise AssertionError(f"bad encoding {e!r}")

    def forward(self, with_aux: bool, with_shared: bool, drop: Any) -> Any:
        """``run(e, P, X, S, aux, B) -> e``: :func:`forward` in that mode, as one function."""
        key = (with_aux, with_shared, id(drop))
        hit = self._forwards.get(key)
        if hit is not None and hit[0] is drop:
            return hit[1]
        with _STRAIGHT_LOCK:  # generation binds names in the shared namespace: one thread at a time
            hit = self._forwards.get(key)
            if hit is not None and hit[0] is drop:
                return hit[1]
            run = self._generate_forward(with_aux, with_shared, drop)
            self._forwards[key] = (drop, run)
            return run

    def _generate_forward(self, with_aux: bool, with_shared: bool, drop: Any) -> Any:
        program = self.program()
        assert program is not None
        ns, body = self.ns, []
        for node in program.nodes:
            i = node.index
            if with_shared and not node.dep:
                body.append(f"e[{i}] = S[{i}]")
            elif node.op == "param":
                body.append(f"e[{i}] = P[{node.target!r}]")
            elif node.op == "input":
                body.append(f"e[{i}] = X[{int(node.target)}]")
            elif node.op == "const":
                body.append(f"e[{i}] = {self.bind(program.constants[int(node.target)])}")
            elif node.op != "call":
                pass
            elif node.target == "getitem":
                body.append(f"e[{i}] = {self.expr(node.args[0])}[{self.expr(node.args[1])}]")
            elif with_aux and node.target in _POOL_WITH_INDICES and not node.kwargs:
                pool, nd = _POOL_WITH_INDICES[node.target]
                body.append(f"e[{i}], aux[{i}] = {self.bind(pool)}(*_pool_params(b{i}(e, B)[0], {nd}, True))")
            elif with_aux and node.target == _SDPA and node.dep:
                body.append(f"e[{i}] = _attention({self.bind(node)}, e, aux, *b{i}(e, B))")
            else:
                op = self.bind(aten_op(node.target)._op)  # the C++ callable OpOverload.__call__ forwards to
                args = ", ".join(self.expr(a) for a in node.args)
                kwargs = "".join(f", {k}={self.expr(v)}" if k.isidentifier() and not keyword.iskeyword(k)
                                 else f", **{{{k!r}: {self.expr(v)}}}" for k, v in node.kwargs)
                body.append(f"e[{i}] = {op}({args}{kwargs})")
            if drop is not None:
                for j, shape_only in drop[i]:
                    body.append(f"e[{j}] = _standin(e[{j}])" if shape_only else f"e[{j}] = None")
        src = "def run(e, P, X, S, aux, B):\n" + "".join(f"    {line}\n" for line in body) + "    return e\n"
        local: dict[str, Any] = {}
        exec(compile(src, f"<attrax program {id(program):x} forward>", "exec"), ns, local)
        return local["run"]


_STRAIGHT: dict[int, _Straight] = {}
_STRAIGHT_LOCK = threading.RLock()


def _straight(program: Program) -> _Straight:
    """The program's :class:`_Straight` code, generated on first use and dropped with the program."""
    hit = _STRAIGHT.get(id(program))
    if hit is not None and hit.program() is program:
        return hit
    with _STRAIGHT_LOCK:
        hit = _STRAIGHT.get(id(program))
        if hit is None or hit.program() is not program:
            hit = _STRAIGHT[id(program)] = _Straight(program)
            key = id(program)
            weakref.finalize(program, lambda: _STRAIGHT.pop(key, None) if _STRAIGHT.get(key) is hit else None)
    return hit


def per_program(program: Program, key: str, compute: Callable[[Program], Any]) -> Any:
    """``compute(program)``, computed once per program (kept while the program lives): for what callers ask of
    a program at every call (a whole-graph scan costs ~0.1 ms on a transformer)."""
    table = _straight(program).derived
    hit = table.get(key, _UNSET)
    if hit is _UNSET:
        hit = table[key] = compute(program)
    return hit


def pool_params(args: Sequence[Any], nd: int, with_input: bool = False) -> tuple[Any, ...]:
    """``(kernel, stride, padding, dilation, ceil_mode)`` of a ``max_poolNd`` call, normalised."""
    k = _ntuple(args[1], nd)
    stride = _ntuple(args[2], nd) if len(args) > 2 and args[2] else k
    padding = _ntuple(args[3], nd) if len(args) > 3 else [0] * nd
    dilation = _ntuple(args[4], nd) if len(args) > 4 else [1] * nd
    ceil = args[5] if len(args) > 5 else False
    out = (k, stride, padding, dilation, ceil)
    return (args[0], *out) if with_input else out


#: ``backward(node, g) -> {ref index: cotangent}`` for one call node
BackwardFn = Callable[[Node, Any], dict[int, Any]]


def reverse(
    program: Program,
    seeds: dict[int, Any],
    backward: BackwardFn,
    arrive: Callable[[Node, Any], Any] | None = None,
    captured: dict[int, Any] | None = None,
) -> dict[int, Any]:
    """Propagate cotangents from ``seeds`` to the inputs; returns ``{input position: cotangent}``.

    Nodes are visited in reverse topological order; each call node with a
    cotangent hands it to ``backward``, whose results are summed into the
    referenced nodes. Tuple-valued nodes hold a list of per-output cotangents,
    filled by their ``getitem`` users. ``arrive(node, g)`` may replace the total
    cotangent of a node before it is propagated (conditional attribution masks
    channels there); ``captured``, if given, receives the total cotangent of the
    nodes whose indices it holds as keys.
    """
    cot: dict[int, Any] = dict(seeds)
    result: dict[int, Any] = {}
    order = reversed(program.nodes) if torch.compiler.is_compiling() else per_program(program, "reverse", _reverse_order)
    for node in order:
        g = cot.pop(node.index, None)
        if g is None or not node.dep:
            continue
        if arrive is not None:
            g = arrive(node, g)
        if captured is not None and node.index in captured:
            captured[node.index] = g
        if node.op == "input":
            result[int(node.target)] = g
            continue
        if node.op != "call":
            continue
        if node.target == "getitem":
            src, slot = node.refs[0], node.args[1][1]
            slots = cot.setdefault(src, {})
            slots[slot] = g if slot not in slots else slots[slot] + g
            continue
        if isinstance(g, dict):  # tuple-valued node: cotangent per output slot
            g = tuple(g.get(k) for k in range(max(g) + 1))
        for ref, grad in backward(node, g).items():
            if grad is None:
                continue
            cot[ref] = grad if ref not in cot else cot[ref] + grad
    return result


def _reverse_order(program: Program) -> tuple[Node, ...]:
    """The nodes a reverse pass can visit (input-dependent calls and inputs), last first."""
    return tuple(n for n in reversed(program.nodes) if n.dep and n.op in ("call", "input"))


# ------------------------------------------------------------------ exact transposes


def exact_vjp(
    program: Program, node: Node, env: Sequence[Any], batch: Any, g: Any, aux: dict[int, Any] | None = None
) -> dict[int, Any]:
    """The true vector-Jacobian product of one node at the values in ``env``.

    Common layers use explicit transposes (``convolution_backward``, ``g @ W``,
    pooling backward kernels), so the layer's forward is not recomputed; any
    other op falls back to ``torch.func.vjp`` of that single op.
    """
    fast = TRANSPOSES.get(node.target)
    if fast is not None:
        args, kwargs = call_args(program, node, env, batch)
        if fast is t_max_pool and aux is not None and node.index in aux:
            nd = _POOL_WITH_INDICES[node.target][1]
            return {node.args[0][1]: unpool(g, args[0], pool_params(args, nd), aux[node.index], nd)}
        out = fast(node, args, kwargs, env[node.index], g)
        if out is not None:
            return out
    return generic_vjp(program, node, env, batch, g)


def unpool(g: Tensor, x: Tensor, params: tuple[Any, ...], indices: Tensor, nd: int) -> Tensor:
    """Scatter-add ``g`` to the argmax positions (the max-pooling backward kernel)."""
    op = torch.ops.aten.max_pool2d_with_indices_backward if nd == 2 else torch.ops.aten.max_pool3d_with_indices_backward
    return op(g, x, *params, indices)


def generic_vjp(program: Program, node: Node, env: Sequence[Any], batch: Any, g: Any) -> dict[int, Any]:
    """``torch.func.vjp`` of one op with respect to its input-dependent float arguments."""
    wrt = [r for r, d in zip(node.refs, node.dep_refs) if d]
    if not wrt:
        return {}
    out_val = env[node.index]
    multi = isinstance(out_val, (tuple, list))
    keep = [k for k, v in enumerate(out_val) if isinstance(v, Tensor) and v.is_floating_point()] if multi else None

    def f(*vals: Tensor) -> Any:
        local = list(env)
        for r, v in zip(wrt, vals):
            local[r] = v
        out = run_node(program, node, local, batch)
        return tuple(out[k] for k in keep) if multi else out

    # a recurrent op traced in eval mode (train=False) runs oneDNN's inference kernel on CPU, whose backward needs
    # the workspace only its training kernel makes: its vjp runs the native kernel (guided backprop on a float32
    # LSTM failed with "got None for argument 'workspace'")
    with _without_onednn() if node.packet in _RECURRENT else contextlib.nullcontext():
        _, vjp_fn = torch.func.vjp(f, *(env[r] for r in wrt))
        if multi:
            cot = tuple(
                (g[k] if (isinstance(g, tuple) and k < len(g) and g[k] is not None) else torch.zeros_like(out_val[k]))
                for k in keep
            )
        else:
            cot = g
        grads = vjp_fn(cot)
    return dict(zip(wrt, grads))


_RECURRENT = frozenset(("lstm", "gru", "rnn_tanh", "rnn_relu"))


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    """oneDNN off for one op's vjp (``torch.backends.mkldnn.flags`` also sets TF32 and warns about it)."""
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


@dataclass
class Streams:
    """The values of one or two forward streams of a program, for rules to read."""

    program: Program
    x: list[Any]
    ref: list[Any] | None = None
    batch: Any = None
    aux_x: dict[int, Any] = field(default_factory=dict)  # per-node extras of the x stream (pool indices)
    aux_ref: dict[int, Any] = field(default_factory=dict)
    #: nodes of the x stream whose value its rule may overwrite (:func:`consumable`; one reverse pass only)
    consume: frozenset[int] = frozenset()
    #: every value of the pass is a plain eager tensor (:func:`plain_eager`), known by the caller: rules need
    #: not ask per tensor; False: they ask
    plain: bool = False

    def args(self, node: Node, which: str = "x") -> tuple[list[Any], dict[str, Any]]:
        env = self.x if which == "x" else self.ref
        assert env is not None
        return call_args(self.program, node, env, self.batch)


@dataclass
class Site:
    """What a rule sees at one call site: the node and the stream values around it."""

    node: Node
    streams: Streams

    @property
    def program(self) -> Program:
        return self.streams.program

    def args(self, which: str = "x") -> list[Any]:
        return self.streams.args(self.node, which)[0]

    def out(self, which: str = "x") -> Any:
        env = self.streams.x if which == "x" else self.streams.ref
        assert env is not None
        return env[self.node.index]

    def consumable(self) -> bool:
        """Whether the rule may write over this node's value of the x stream (:func:`consumable`)."""
        return self.node.index in self.streams.consume


#: ops whose value is a new buffer of its own (never a view of an argument, never an argument itself), whose
#: exact transposes read only their arguments
_FRESH_OUTPUT = frozenset(("linear", "addmm", "add", "sub", "mul", "div", "mean", "sum", "silu", "gelu"))
#: ops known to return a new buffer (never an argument or a view of one), for :func:`consumable`'s alias walk
#: (not einsum: with one operand it returns a view, e.g. "bi->bi", "ii->i")
_NEW_BUFFER = frozenset(
    """linear addmm mm bmm matmul baddbmm add sub rsub mul div neg pow exp log log1p expm1 sqrt rsqrt abs tanh
    sigmoid relu gelu silu softplus hardswish hardsigmoid elu leaky_relu softmax _softmax log_softmax _log_softmax
    layer_norm native_layer_norm rms_norm group_norm batch_norm mean sum cat stack scaled_dot_product_attention conv1d
    conv2d conv3d convolution embedding max_pool2d max_pool3d avg_pool2d avg_pool3d adaptive_avg_pool2d
    adaptive_avg_pool3d gather index_select masked_fill where clamp clamp_min clamp_max erf sin cos""".split())


def consumable(program: Program) -> frozenset[int]:
    """Nodes whose value nothing reads once the reverse pass has run their rule, so the rule may write over it:
    a reverse pass visits nodes after every node that reads them (their users come later in the program), so
    a value is dead after its own node's rule unless another value shares its memory or it is returned. So:
    ops that make a buffer of their own (``_FRESH_OUTPUT``), except the output and what it is a view of. Only
    for a caller that runs one reverse pass over the stream and keeps nothing else of it (``lrp``). Once per
    program."""
    return per_program(program, "consumable", _consumable)


def _consumable(program: Program) -> frozenset[int]:
    # the output and every value it may share memory with: through any op not known to return a new buffer
    # (views, and ops that may hand back an argument itself: eval dropout, a cast to the dtype it has, ...)
    kept: set[int] = set()
    todo = [program.output]
    while todo:
        i = todo.pop()
        if i in kept:
            continue
        kept.add(i)
        node = program.nodes[i]
        if node.op == "call" and node.packet not in _NEW_BUFFER:
            todo.extend(node.refs)
    return frozenset(n.index for n in program.nodes
                     if n.op == "call" and n.packet in _FRESH_OUTPUT and n.index not in kept and n.dep)


def substitute(program: Program, rule_for: Callable[[Program, Node], Any], method: str) -> tuple[Any, ...]:
    """The rewriting pass: choose a rule for every input-dependent call site, or fail naming it.

    ``rule_for(program, node)`` returns a rule (an object with
    ``backward(site, g)``) or None when the method has none for that op; the
    first such node raises before any tensor work is done.
    """
    plan: list[Any] = [None] * len(program.nodes)
    for node in program.nodes:
        if node.op != "call" or not node.dep or node.target == "getitem" or not any(node.dep_refs):
            continue
        if not node.float_out and node.packet in _CASTS:
            raise UnsupportedOperation(
                f"{method} cannot attribute through {node.describe()}: it casts a value computed from the input to "
                f"an integer dtype, which has no derivative and no rule (the attribution through it would be "
                f"silently zero). Keep the computation in floating point (e.g. torch.round instead of .to(torch.uint8) "
                f"where a straight-through value is meant), or cast outside model_fn"
            )
        rule = rule_for(program, node)
        if rule is None:
            raise UnsupportedOperation(
                f"{method} has no rule for {node.describe()}; an op without a rule is an error, never a "
                f"silent fallback to the gradient{_hint(node)}"
            )
        plan[node.index] = rule
    return tuple(plan)


def _hint(node: Node) -> str:
    """Why a known op without a rule is in the graph, where the model can avoid it."""
    if node.packet in ("_nested_tensor_from_mask", "_nested_tensor_from_mask_left_aligned",
                       "_transformer_encoder_layer_fwd", "_native_multi_head_attention"):
        return (". It is PyTorch's inference fast path of nn.TransformerEncoder/MultiheadAttention (eval mode, a "
                "padding mask): build the encoder with enable_nested_tensor=False, or call "
                "torch.backends.mha.set_fastpath_enabled(False) before explaining")
    if node.packet == "size":
        return (". A size read as a tensor op usually comes from TorchScript (@torch.jit.script helpers, as in "
                "DeBERTa's attention), which the tracer cannot see through; a model without the scripted helpers "
                "traces")
    return ""


#: ops that convert dtype; to an integer or bool dtype they cut every derivative
_CASTS = frozenset(("_to_copy", "to", "_to_dtype", "type_as", "_autocast_to_reduced_precision", "view_as_real", "view"))


class ProgramBuilder:
    """Build a new program from an old one: copy, insert and alias nodes (for canonizers).

    Indices in encoded arguments refer to the *old* program for copied nodes and
    to the *new* program for inserted ones; ``remap`` translates.
    """

    def __init__(self, program: Program) -> None:
        self.src = program
        self.nodes: list[Node] = []
        self.remap: dict[int, int] = {}

    def _renumber(self, e: Any) -> Any:
        tag = e[0]
        if tag == "n":
            return ("n", self.remap[e[1]])
        if tag in ("l", "t"):
            return (tag, tuple(self._renumber(v) for v in e[1]))
        return e

    def _add(self, node: Node, args: tuple[Any, ...], kwargs: tuple[tuple[str, Any], ...]) -> int:
        i = len(self.nodes)
        refs = tuple(dict.fromkeys(_refs(args) + _refs(tuple(v for _, v in kwargs))))
        dep = node.op == "input" or (node.op == "call" and any(self.nodes[r].dep for r in refs))
        dep_refs = tuple(self.nodes[r].dep and self.nodes[r].float_out for r in refs)
        nonneg = node.op == "call" and nonnegative(node.target, node.packet, args, self.nodes)
        self.nodes.append(replace(node, index=i, args=args, kwargs=kwargs, refs=refs, dep=dep, dep_refs=dep_refs,
                                  nonneg=nonneg))
        return i

    def copy(self, old: Node, **changes: Any) -> int:
        """Copy node ``old``; ``args=``/``kwargs=`` in ``changes`` are given in *new* indices."""
        args = changes.pop("args", None)
        kwargs = changes.pop("kwargs", None)
        args = tuple(self._renumber(a) for a in old.args) if args is None else args
        kwargs = tuple((k, self._renumber(v)) for k, v in old.kwargs) if kwargs is None else kwargs
        i = self._add(replace(old, **changes), args, kwargs)
        self.remap[old.index] = i
        return i

    def call(self, target: str, args: tuple[Any, ...], like: Node, name: str) -> int:
        """Insert a new call node; ``args`` are encoded with *new* indices."""
        node = Node(0, "call", target, name=f"{like.name}_{name}", module=like.module, module_type=like.module_type,
                    layer=like.layer, float_out=True)
        return self._add(node, args, ())

    def ref(self, old_index: int) -> tuple[str, int]:
        return ("n", self.remap[old_index])

    def alias(self, old_index: int, new_index: int) -> None:
        self.remap[old_index] = new_index

    def build(self) -> Program:
        return replace(self.src, nodes=tuple(self.nodes), output=self.remap[self.src.output])


def select_before_linear(program: Program, allow: Callable[[int], bool] | None = None) -> Program:
    """Move a ``select``/``slice`` of a dense layer's output before the layer: ``linear(x)[:, -1]`` becomes
    ``linear(x[:, -1])``.

    A language model's head maps every position to the vocabulary, and an explanation of the next token
    keeps one of them (``output=lambda o: o.logits[:, -1]``): computed the other way round, the head runs on
    that position only, forward and backward (on the benchmark's Llama, 4 layers at seq 128, the head was a
    tenth of the time). A dense layer acts on the last dimension alone, so for a selection along any other
    dimension both orders compute the same values (to the matrix product's rounding), and every rule at the
    layer (ε, z+, the gradient, ...) sees the rows it would have seen, minus rows whose relevance is zero.
    Done where the layer's output feeds the selection only, along a non-batch dimension other than the last;
    the layer node keeps its module and name, so composites assign it the same rule. Only for methods that
    return relevance at the input (``lrp``): a layer's own output changes shape. ``allow(layer index)``: whether
    the layer's rule treats rows alone (a stabiliser scaled by the whole output's norm does not).
    """
    users = program.consumers()
    moves: dict[int, int] = {}  # linear index -> selection index
    for node in program.nodes:
        if node.op != "call" or node.packet not in ("select", "slice") or node.args[0][0] != "n":
            continue
        layer = program.nodes[node.args[0][1]]
        if (layer.op != "call" or layer.packet != "linear" or users[layer.index] != [node.index] or layer.shape is None
                or node.shape is None or layer.args[0][0] != "n" or layer.kwargs):
            continue
        if not all(a[0] == "c" and isinstance(a[1], (int, type(None))) for a in (*node.args[1:], *(v for _, v in node.kwargs))):
            continue
        dim = node.args[1][1] if len(node.args) > 1 else dict(node.kwargs).get("dim", ("c", 0))[1]
        nd = len(layer.shape)
        dim = dim + nd if isinstance(dim, int) and dim < 0 else dim
        source = program.nodes[layer.args[0][1]]
        if (not isinstance(dim, int) or not 1 <= dim < nd - 1 or source.shape is None or len(source.shape) != nd
                or tuple(source.shape[:-1]) != tuple(layer.shape[:-1])):
            continue
        if allow is None or allow(layer.index):
            moves[layer.index] = node.index
    if not moves:
        return program
    selections = {s: l for l, s in moves.items()}
    b = ProgramBuilder(program)
    for node in program.nodes:
        if node.index in moves:
            continue  # emitted at its selection
        if node.index in selections:
            layer = program.nodes[selections[node.index]]
            source = program.nodes[layer.args[0][1]]
            picked = b.copy(node, args=(b.ref(source.index), *(b._renumber(a) for a in node.args[1:])),
                            shape=(*node.shape[:-1], source.shape[-1]), name=f"{node.name}_first")
            b.copy(layer, args=(("n", picked), *(b._renumber(a) for a in layer.args[1:])), shape=node.shape)
            b.alias(node.index, b.remap[layer.index])
            continue
        b.copy(node)
    return b.build()


#: ops an elementwise function of one tensor is written with (their other operands Python numbers)
_CHAIN_OPS = frozenset("mul add sub rsub div pow tanh erf sigmoid neg exp".split())

#: single ops an elementwise region may compute: (target, encoded kwargs, the op on float64 values)
_FUSED_REGIONS: tuple[tuple[str, tuple[tuple[str, Any], ...], Callable[[Tensor], Tensor]], ...] = (
    ("aten.gelu.default", (("approximate", ("c", "tanh")),),
     lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
    ("aten.gelu.default", (), torch.nn.functional.gelu),
    ("aten.silu.default", (), torch.nn.functional.silu),
)


def fuse_elementwise(program: Program) -> Program:
    """Replace an activation written out in elementwise steps by the one op it computes: GPT-2's
    ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`` becomes ``gelu(x, approximate="tanh")``.

    A region is a set of nodes built from :data:`_CHAIN_OPS` with Python numbers as their other operands, all of
    one input-dependent tensor ``s`` and of its shape, whose inner values nothing outside reads. What it computes
    is a fixed function of ``s`` applied elementwise, so it is identified by its values: it is replaced where it
    equals one of :data:`_FUSED_REGIONS` on ~4000 float64 points over [-20, 20] (and at 0, tiny and large
    values) to 1e-12, i.e. where it is that function written out (a rounded constant such as 0.7978845 is
    not, and stays as written). The fused op computes the same values to the float rounding of the steps
    (measured on GPT-2: the written-out GELU was 9 of the AttnLRP forward's ops and 8 % of its time at seq 128).
    Every rule method that treats such a region as one activation (LRP's identity and gradient rules, the
    gradient) sees the same function; DeepLift does not use it (its rules on the steps give another, equally
    complete attribution, so its results on written-out activations stay as they were).
    """
    nodes = program.nodes
    source: dict[int, int] = {}  # node of a chain -> the tensor it is an elementwise function of
    for node in nodes:
        if node.op != "call" or node.packet not in _CHAIN_OPS or not node.dep or node.shape is None:
            continue
        if any(k != "alpha" or v[0] != "c" or type(v[1]) not in (int, float) for k, v in node.kwargs):
            continue
        leaves = set()
        for a in node.args:
            if a[0] == "n":
                leaves.add(source.get(a[1], a[1]))
            elif a[0] != "c" or type(a[1]) not in (int, float):
                leaves.add(-1)  # a tensor constant, a list, a dtype: not a function of one tensor alone
        if len(leaves) == 1:
            (s,) = leaves
            if s >= 0 and nodes[s].shape == node.shape and nodes[s].float_out:
                source[node.index] = s
    if not source:
        return program
    users = program.consumers()
    fused: dict[int, tuple[int, Any]] = {}  # root -> (source, (target, kwargs))
    inner: set[int] = set()
    for root, s in source.items():
        if root != program.output and all(source.get(u) == s for u in users[root]):
            continue  # read only inside a larger region of s
        region, stack = set(), [root]
        while stack:
            i = stack.pop()
            if i in region:
                continue
            region.add(i)
            stack.extend(a[1] for a in nodes[i].args if a[0] == "n" and a[1] != s)
        if len(region) < 2 or any(source.get(i) != s for i in region):
            continue
        if any(u not in region for i in region - {root} for u in users[i]):
            continue  # an inner value is read elsewhere too
        op = _identify(program, s, sorted(region))
        if op is not None:
            fused[root] = (s, op)
            inner |= region - {root}
    if not fused:
        return program
    b = ProgramBuilder(program)
    for node in nodes:
        if node.index in inner:
            continue
        if node.index in fused:
            s, (target, kwargs) = fused[node.index]
            b.copy(node, target=target, packet=target.split(".")[1], args=(b.ref(s),), kwargs=kwargs)
        else:
            b.copy(node)
    return b.build()


def _identify(program: Program, s: int, region: list[int]) -> Any:
    """The ``(target, kwargs)`` of :data:`_FUSED_REGIONS` the region computes from ``s``, or None."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    # plain float64 values, outside any trace around this call (ax.export, make_fx): nothing of it is recorded
    with unset_fake_temporarily(), disable_proxy_modes_tracing(), torch.no_grad():
        wide = torch.logspace(-8, 6, 400, dtype=torch.float64)
        probe = torch.cat([torch.linspace(-20.0, 20.0, 4001, dtype=torch.float64), wide, -wide,
                           torch.tensor([0.0, 1e-30, -1e-30], dtype=torch.float64)])
        values: dict[int, Any] = {s: probe}
        try:
            for i in region:
                node = program.nodes[i]
                args = [values[a[1]] if a[0] == "n" else a[1] for a in node.args]
                values[i] = aten_op(node.target)(*args, **{k: v[1] for k, v in node.kwargs})
        except (RuntimeError, TypeError):
            return None
        out = values[region[-1]]
        if not isinstance(out, Tensor) or out.dtype != torch.float64 or out.shape != probe.shape:
            return None
        for target, kwargs, fn in _FUSED_REGIONS:
            if torch.allclose(out, fn(probe), rtol=1e-12, atol=1e-15):
                return target, kwargs
    return None


# ------------------------------------------------------------ the plain gradient on a program


#: a gradient method traces a model for :func:`gradient_program` at its third call with the same input spec, batch
#: and target rows (before: the model itself): a trace costs ~0.5 s on a small GPT-2, what one call of saliency or
#: a few of IG gain at most, so inputs of ever new shapes (prompts of every length) are never traced for it
GRADIENT_PROGRAM_AFTER = 3


def gradient_program(model_fn: Any, params: Any, xs: Sequence[Tensor], rows: tuple[int, Any] | None = None,
                     count: bool = False) -> tuple[Program, Any, bool] | None:
    """``(program, drop, selected)`` to evaluate ``model_fn`` with for a plain gradient, where that is faster than
    the model itself; else None (the caller runs the model).

    The program is traced without decompositions (the model's own fused ops: ``layer_norm``, attention, ``addmm``)
    and then :func:`fuse_elementwise` (GPT-2's written-out GELU: 9 ops forward and their backward, about a fifth
    of Integrated Gradients' time on GPT-2 at seq 96), the gradient through it being the model's own to the float
    rounding of the activation. ``rows = (dim, index)``: the target reads ``out.select(dim, index)`` only (an LM
    target at one position), or with ``index = (start, stop)`` that block of rows (the positions ``ax.lm.generation``
    explains); the program then ends in that selection, moved up through the ops computed row by row
    (:func:`select_pushdown`: the head, final norm and last block's MLP on those rows), and returns those rows
    (``selected``); a selection the model's output makes itself moves the same way. Offered only where one of these
    applies; only to eager calls on a :class:`FunctionalModel` in eval mode (no training flag; no random op in
    the program), memoised under the model's fingerprint like every program. A model with neither is remembered
    per fingerprint and input spec, so it is traced once, not at every batch size; a model the tracer refuses is
    run as it is. ``drop``: each value is released after its last reader (autograd keeps what the backward needs).
    ``count``: a method's call, counted per spec (:data:`GRADIENT_PROGRAM_AFTER`). A model whose fingerprint a trace
    changed (its forward writes into its own state) is never traced for this again.
    """
    if (not isinstance(model_fn, FunctionalModel) or isinstance(model_fn, BoundModel)
            or not getattr(model_fn, "program_gradients", True) or torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None or torch.is_inference_mode_enabled()
            or any(_training_flags(model_fn)) or not is_concrete(*xs)):
        return None  # (a trace around this call, fake or batched inputs: the model as it is; bound arguments: a
        # program per mask, where the model runs as it is for any; inference mode: grad_of_selected takes gradients
        # outside it, and the first-use check could not run in it)
    if model_fn.__dict__.get("_writes_state"):  # (its forward writes into the model: run as it is)
        return None
    if rows is None and not model_fn.derived("writes_out_activations", lambda: _writes_out_activations(model_fn)):
        return None  # nothing to fuse: not traced at all
    fp = model_fn.fingerprint()
    spec, batch = program_spec(model_fn, params, xs)
    key = ("gradient_program", spec, batch)
    shapes = {name: shape for name, shape, *_ in spec[0]}
    if count:
        calls = model_fn.derived("gradient_calls", dict)
        seen = calls[(spec, batch, rows)] = calls.get((spec, batch, rows), 0) + 1
        if len(calls) > 1024:
            calls.clear()
        if seen < GRADIENT_PROGRAM_AFTER:
            return None

    def compute() -> tuple[Program, bool] | None:
        try:
            traced = trace_program(model_fn, spec, batch, fp, native=True)
        except Exception:  # noqa: BLE001 - the model runs as it is; rule methods report the tracer's error
            return None
        if any(_random(n) for n in traced.nodes):
            return None
        program = fuse_elementwise(traced)
        # a selection the model makes itself (output=lambda o: o.logits[:, -1]) moves up as a target's does
        dense = dense_layers(program, shapes)
        pushed = select_pushdown(dense, shapes)
        program = program if pushed is dense else pushed  # (nothing moved: the model's own layers)
        return program, program is not traced  # (changed: fused or moved, a gain of its own)

    def gain() -> bool:
        hit = memoised(model_fn, key, compute, fingerprint=fp)
        return hit is not None and (hit[1] or (rows is not None and _dense_output(hit[0])))

    useful = memoised(model_fn, ("gradient_gain", spec[0], spec[1], rows is not None), gain, fingerprint=fp)
    if model_fn._fingerprint_now() != fp:  # the trace wrote into the model where the restore does not reach
        model_fn.__dict__["_writes_state"] = True
        return None
    if not useful:
        return None
    hit = memoised(model_fn, key, compute, fingerprint=fp)
    if hit is None:
        return None
    program, changed = hit
    if rows is not None:
        moved = per_program(program, ("rows", *rows), lambda p: _select_rows(p, *rows, shapes))
        if moved is not None and per_program(moved, "agrees", lambda m: _agrees(m, model_fn, params, xs, rows)):
            return moved, per_program(moved, "last_reads", _last_reads), True
    if not changed or not per_program(program, "agrees", lambda m: _agrees(m, model_fn, params, xs, None)):
        return None
    return program, per_program(program, "last_reads", _last_reads), False


def take_rows(out: Tensor, dim: int, index: Any) -> Tensor:
    """``out.select(dim, index)`` for an int ``index``, ``out.narrow`` to the block ``index = (start, stop)``."""
    return out.select(dim, index) if isinstance(index, int) else out[(slice(None),) * dim + (slice(*index),)]


def _agrees(program: Program, model_fn: Any, params: Any, xs: Sequence[Tensor], rows: tuple[int, Any] | None) -> bool:
    """At its first use, a program's value and one vector-Jacobian product equal the model's own at these inputs (to
    the dtype's rounding): a trace that lost a dependency (a reviewer found an in-place add into a cast copy
    replaced by a constant, half the gradient) is never used, the model runs as it is."""
    try:
        with torch.enable_grad():
            a = tuple(x.detach().requires_grad_() for x in xs)
            b = tuple(x.detach().requires_grad_() for x in xs)
            ref = model_fn(params, *a)
            if rows is not None:
                ref = take_rows(ref, *rows)
            got = forward(program, params, b)[program.output]
            if not isinstance(ref, Tensor) or not isinstance(got, Tensor) or ref.shape != got.shape or ref.dtype != got.dtype:
                return False
            if not ref.is_floating_point() or not ref.requires_grad or not got.requires_grad:
                return False
            cot = torch.sin(torch.arange(ref.numel(), dtype=torch.float64, device=ref.device) * 0.7 + 0.3)
            cot = cot.to(ref.dtype).reshape(ref.shape)
            want = torch.autograd.grad(ref, a, cot, allow_unused=True, materialize_grads=True)
            have = torch.autograd.grad(got, b, cot, allow_unused=True, materialize_grads=True)
    except Exception:  # noqa: BLE001 - anything the check cannot run: the model as it is
        return False
    tol = {torch.float64: 1e-7, torch.float32: 1e-3}.get(ref.dtype, 5e-2)

    def close(u: Tensor, v: Tensor) -> bool:
        scale = float(v.detach().abs().max()) if v.numel() else 0.0
        return u.shape == v.shape and bool(torch.isfinite(u).all() == torch.isfinite(v).all()) and float(
            (u.detach() - v.detach()).abs().nan_to_num(0.0).max() if u.numel() else 0.0) <= tol * max(scale, 1e-30)

    return close(got, ref) and all(close(u, v) for u, v in zip(have, want))


#: names whose presence in a forward's code suggests an activation written out in steps
_STEP_ACTIVATIONS = frozenset(("tanh", "erf", "sigmoid"))


def _writes_out_activations(model_fn: Any) -> bool:
    """Some forward of the model outside ``torch`` itself (a module's, or the wrapped function) names ``tanh``,
    ``erf`` or ``sigmoid``: only such a model is traced to look for regions :func:`fuse_elementwise` fuses (a
    first gradient call on any other model stays free of a trace)."""
    if model_fn.module is None:
        codes = [getattr(getattr(model_fn, "fn", None), "__code__", None)]
    else:
        codes = [getattr(getattr(type(m), "forward", None), "__code__", None) for m in model_fn.module.modules()
                 if not type(m).__module__.startswith("torch.")]
    return any(code is not None and not _STEP_ACTIVATIONS.isdisjoint(code.co_names) for code in codes)


def _dense_output(program: Program) -> bool:
    out = program.nodes[program.output]
    return out.op == "call" and out.packet == "linear"


def _select_rows(program: Program, dim: int, index: Any, shapes: dict[str, tuple[int, ...]]) -> Program | None:
    """``program`` with ``out.select(dim, index)`` (or the block ``index = (start, stop)`` of rows) as its output,
    moved up by :func:`select_pushdown`; None where it does not move (nothing gained)."""
    out = program.nodes[program.output]
    if out.shape is None or not 0 < dim < len(out.shape):
        return None
    if isinstance(index, int) and not -out.shape[dim] <= index < out.shape[dim]:
        return None
    if not isinstance(index, int) and not 0 <= index[0] < index[1] <= out.shape[dim]:
        return None
    b = ProgramBuilder(program)
    for node in program.nodes:
        b.copy(node)
    picked = _add_rows(b, out, out.shape, out, dim, index, f"{out.name}_rows")
    selected = replace(b.build(), output=picked)
    moved = select_pushdown(dense_layers(selected, shapes), shapes)
    return None if moved is selected else moved


def dense_layers(program: Program, shapes: dict[str, tuple[int, ...]]) -> Program:
    """GPT-2's ``Conv1D``, ``addmm(b, x.view(-1, D), W).view(*x.shape[:-1], O)``, as ``linear(x, W.t(), b)``: one
    node that acts on the last dim alone (the same kernel: ``linear`` flattens a contiguous input for ``addmm``),
    so :func:`select_pushdown` can move a selection before it. ``shapes``: the parameters' shapes."""
    nodes, users = program.nodes, program.consumers()

    def shape(i: int) -> Any:
        return _shape_of(nodes[i], shapes, program)

    found: dict[int, tuple[int, int | None, Any, int]] = {}  # outer view -> (x, W of an addmm, bias, inner view)
    for v in nodes:
        if v.op != "call" or v.packet != "view" or v.args[0][0] != "n" or v.shape is None:
            continue
        mm = nodes[v.args[0][1]]
        if mm.op != "call" or mm.kwargs or users[mm.index] != [v.index]:
            continue
        if mm.target == "aten.linear.default":  # the same, decomposed for the rule methods: linear(x2d, W.t(), b)
            (tz, z) = mm.args[0]
            if tz != "n" or any(a[0] != "n" or nodes[a[1]].dep for a in mm.args[1:]):
                continue
            w, bias = None, None
        elif mm.target == "aten.addmm.default":
            (tb, bias), (tz, z), (tw, w) = mm.args
            if tz != "n" or tw != "n" or nodes[w].dep or shape(w) is None or len(shape(w)) != 2:
                continue
            if tb != "n" or nodes[bias].dep or shape(bias) is None or len(shape(bias)) != 1:
                continue  # (linear's bias is one row; addmm's may be a matrix)
            bias = mm.args[0]
        else:
            continue
        flat = nodes[z]
        if flat.op != "call" or flat.packet != "view" or users[z] != [mm.index] or flat.args[0][0] != "n":
            continue
        x = nodes[flat.args[0][1]]
        if x.shape is None or len(x.shape) < 2 or tuple(x.shape[:-1]) != tuple(v.shape[:-1]):
            continue
        found[v.index] = (x.index, w, bias, z)
    if not found:
        return program
    skip = {nodes[v].args[0][1] for v in found} | {f[3] for f in found.values()}
    b = ProgramBuilder(program)
    for node in nodes:
        if node.index in skip:
            continue
        if node.index in found and found[node.index][1] is None:  # a linear: on x itself
            mm = nodes[node.args[0][1]]
            b.copy(mm, args=(b.ref(found[node.index][0]), *(b._renumber(a) for a in mm.args[1:])), shape=node.shape)
            b.alias(node.index, b.remap[mm.index])
        elif node.index in found:
            x, w, bias, _ = found[node.index]
            assert w is not None
            weight = nodes[w]
            t = b._add(Node(0, "call", "aten.t.default", name=f"{weight.name}_t", module=node.module,
                            module_type=node.module_type, layer=node.layer, shape=tuple(reversed(shape(w)))),
                       (b.ref(w),), ())
            mm = nodes[node.args[0][1]]
            b.copy(mm, target="aten.linear.default", packet="linear",
                   args=(b.ref(x), ("n", t), b._renumber(bias)), shape=node.shape)
            b.alias(node.index, b.remap[mm.index])
        else:
            b.copy(node)
    return b.build()


#: ops computed element by element from their first operand (other arguments: options)
_ROW_UNARY = frozenset("""gelu relu silu tanh sigmoid neg exp log pow rsqrt sqrt reciprocal abs square erf softplus
    clone contiguous alias _to_copy to dropout feature_dropout alpha_dropout""".split())
_ROW_BINARY = frozenset("add sub mul div".split())


def select_pushdown(program: Program, shapes: dict[str, tuple[int, ...]] | None = None,
                    allow: Callable[[Node], bool] | None = None) -> Program:
    """Move ``select(v, d, i)`` before the ops that computed ``v`` where each row along ``d`` of ``v`` is computed
    from that row of their operands alone: dense layers (``d`` not the feature dim), ``layer_norm`` (``d`` before the
    normalised dims), elementwise ops. An LM target at the last position needs the last position of the last
    block's MLP, final norm and head only: those then run on one row, forward and backward (the gradient's
    value is the same; the products round as products of fewer rows do). A value is moved past only where every
    reader of it selects the same row; operands read elsewhere stay whole and are selected. A ``slice(v, d, a, b)``
    (step 1) moves the same way, keeping the dim (``ax.lm.generation``'s block of positions); an operand of size 1
    along it is read whole (broadcast). For the plain gradient (:func:`gradient_program`) and LRP's rows
    (``lrp._rows_first``).
    ``shapes``: the parameters' shapes (a parameter's node has none). ``allow(node)``: whether a node may be moved
    past (LRP: its rule treats rows alone).
    """
    for _ in range(len(program.nodes)):
        moved = _push_one(program, shapes or {}, allow)
        if moved is None:
            return program
        program = moved
    return program


def _selection(node: Node) -> tuple[int, int, Any] | None:
    """``(source, dim, index)`` of a ``select.int`` with constant dim and index, or ``(source, dim, (start, stop))``
    of a ``slice.Tensor`` with constant bounds and step 1 (a block of rows: the positions ``ax.lm.generation``
    explains); else None. Indices as written (negative ones normalised by the caller)."""
    if node.op != "call" or node.kwargs:
        return None
    if node.target == "aten.select.int" and len(node.args) == 3:
        (ts, src), (td, dim), (ti, index) = node.args
        if ts != "n" or td != "c" or ti != "c" or type(dim) is not int or type(index) is not int:
            return None
        return src, dim, index
    if node.target == "aten.slice.Tensor" and 4 <= len(node.args) <= 5 and node.args[0][0] == "n":
        if any(a[0] != "c" or type(a[1]) is not int for a in node.args[1:]) or node.args[4:] not in ((), (("c", 1),)):
            return None
        return node.args[0][1], node.args[1][1], (node.args[2][1], node.args[3][1])
    return None


def _normal_rows(index: Any, size: int) -> Any:
    """A select's index or a slice's ``(start, stop)`` with negative and out-of-range bounds resolved for a dim of
    ``size``; None where that selects nothing (an empty slice)."""
    if isinstance(index, int):
        return index + size if index < 0 else index
    start, stop = (min(max(e + size if e < 0 else e, 0), size) for e in index)
    return (start, stop) if start < stop else None


def _push_one(program: Program, shapes: dict[str, tuple[int, ...]], allow: Callable[[Node], bool] | None = None
              ) -> Program | None:
    users = program.consumers()
    nodes = program.nodes
    for node in nodes:
        sel = _selection(node)
        if sel is None:
            continue
        src, dim, index = sel
        v = nodes[src]
        if v.op != "call" or not v.dep or v.shape is None or src == program.output or (allow is not None and not allow(v)):
            continue
        nd = len(v.shape)
        dim = dim + nd if dim < 0 else dim
        if not 0 <= dim < nd:
            continue
        index = _normal_rows(index, v.shape[dim])
        readers = [nodes[u] for u in users[src]]
        if index is None or not all((r := _selection(u)) is not None and (r[1] + nd if r[1] < 0 else r[1]) == dim
                                    and _normal_rows(r[2], v.shape[dim]) == index for u in readers):
            continue
        plan = _row_operands(program, v, dim, shapes)
        if plan is None:
            continue
        # one selection per (operand, dim, row): an operand read twice (h * h), or selected already by an earlier
        # move (h * tanh(h) + h), is read through one node, so the rules still see one tensor (a reviewer found an
        # elementwise expression of h split into two and given other rules)
        same: dict[tuple[int, int, int], list[int]] = {}
        for n in nodes:
            s_ = _selection(n)
            if s_ is not None and nodes[s_[0]].shape is not None:
                k = nodes[s_[0]]
                d_ = s_[1] + len(k.shape) if s_[1] < 0 else s_[1]  # type: ignore[arg-type]
                if 0 <= d_ < len(k.shape):  # type: ignore[arg-type]
                    same.setdefault((s_[0], d_, _normal_rows(s_[2], k.shape[d_])), []).append(n.index)  # type: ignore[index]
        b = ProgramBuilder(program)
        merged: set[int] = set()
        for n in nodes:
            if n.index in merged:
                continue
            if n.index == src:
                args = list(b._renumber(a) for a in v.args)
                made: dict[tuple[int, int, int], int] = {}
                for pos, d in plan:
                    operand = nodes[v.args[pos][1]]
                    whole = _shape_of(operand, shapes, program)
                    size = whole[d]
                    if size == 1 and not isinstance(index, int):
                        continue  # broadcast along the dim: read whole by a block of rows
                    row = index if size > 1 else 0
                    earlier = [o for o in same.get((operand.index, d, row), ()) if o < src]
                    if earlier and (operand.index, d, row) not in made:
                        made[(operand.index, d, row)] = b.remap[earlier[0]]
                    if (operand.index, d, row) not in made:
                        made[(operand.index, d, row)] = picked = _add_rows(b, operand, whole, v, d, row,
                                                                           f"{operand.name}_row")
                        for old in same.get((operand.index, d, row), ()):
                            if old != node.index and old > src:  # a later selection of the same row: this one
                                b.alias(old, picked)
                                merged.add(old)
                    args[pos] = ("n", made[(operand.index, d, row)])
                shape = _rows_shape(v.shape, dim, index)
                if v.packet in ("view", "reshape", "_unsafe_view"):
                    args[1] = ("l", tuple(("c", d) for d in shape))
                new = b.copy(v, args=tuple(args), kwargs=tuple((k, b._renumber(a)) for k, a in v.kwargs), shape=shape)
                for r in readers:
                    b.alias(r.index, new)
            elif n.index in {r.index for r in readers}:
                continue
            else:
                b.copy(n)
        return b.build()
    return None


def _rows_shape(shape: Sequence[int], dim: int, index: Any) -> tuple[int, ...]:
    """The shape of ``shape``'s rows ``index`` along ``dim``: a select drops the dim, a ``(start, stop)`` block
    keeps it."""
    if isinstance(index, int):
        return (*shape[:dim], *shape[dim + 1:])
    return (*shape[:dim], index[1] - index[0], *shape[dim + 1:])


def _add_rows(b: ProgramBuilder, source: Node, shape: tuple[int, ...], like: Node, dim: int, index: Any, name: str
              ) -> int:
    """A new ``select(source, dim, index)`` (an int index) or ``slice(source, dim, start, stop)`` (a ``(start,
    stop)`` block) node in ``b`` (``source``: an old node of ``shape``), placed in ``like``'s module."""
    node = Node(0, "call", "aten.select.int" if isinstance(index, int) else "aten.slice.Tensor", name=name,
                module=like.module, module_type=like.module_type, layer=like.layer, float_out=source.float_out,
                shape=_rows_shape(shape, dim, index))
    bounds = (("c", index),) if isinstance(index, int) else (("c", index[0]), ("c", index[1]))
    return b._add(node, (b.ref(source.index), ("c", dim), *bounds), ())


def _shape_of(node: Node, shapes: dict[str, tuple[int, ...]], program: Program | None = None) -> Any:
    if node.op == "param":
        return shapes.get(node.target)
    if node.op == "const" and node.shape is None and program is not None:
        return tuple(program.constants[int(node.target)].shape)
    return node.shape


def _row_operands(program: Program, v: Node, dim: int, shapes: dict[str, tuple[int, ...]]) -> list[tuple[int, int]] | None:
    """For ``v`` computed row by row along ``dim``: ``(argument position, its dim)`` of every tensor operand that
    has the dim (an operand broadcast along it, or without it, is read whole); None where ``v`` is not."""
    nd = len(v.shape)  # type: ignore[arg-type]
    packet, nodes = v.packet, program.nodes
    if any(k not in ("alpha", "approximate", "dtype", "memory_format", "layout", "device", "pin_memory", "non_blocking",
                     "copy") for k, _ in v.kwargs):
        return None
    tensors = [(pos, a[1]) for pos, a in enumerate(v.args) if a[0] == "n"]
    if packet in ("view", "reshape", "_unsafe_view"):
        x = nodes[v.args[0][1]] if v.args[0][0] == "n" else None
        if x is None or x.shape is None or len(tensors) != 1 or tuple(x.shape[:dim + 1]) != tuple(v.shape[:dim + 1]):
            return None  # the dims up to the selected one are not kept as they are
        return [(0, dim)]
    # elementwise ops: operands, numbers and options; a tensor constant only as a binary op's operand without the
    # selected dim (read whole, as is); no batch-affine size
    allowed = ("n", "c", "dt", "mf", "lay", "dev", "k") if packet in _ROW_BINARY else ("n", "c", "dt", "mf", "lay", "dev")
    if packet not in ("linear", "layer_norm", "mean", "sum") and any(
            a[0] not in allowed or (a[0] == "k" and program.constants[a[1]].dim() >= nd - dim) for a in v.args):
        return None
    if packet in _ROW_UNARY:
        if v.args[0][0] != "n" or nodes[v.args[0][1]].shape != v.shape or len(tensors) != 1:
            return None
        if packet in ("dropout", "feature_dropout", "alpha_dropout") and v.args[2:] != (("c", False),):
            return None
        return [(0, dim)]
    if packet == "linear":
        x = nodes[v.args[0][1]] if v.args[0][0] == "n" else None
        if x is None or x.shape is None or len(x.shape) != nd or dim == nd - 1 or x.shape[:-1] != v.shape[:-1]:
            return None
        if any(pos > 0 and nodes[i].dep for pos, i in tensors) or any(a[0] not in ("n", "c") for a in v.args):
            return None  # weights computed from x: not a dense layer
        return [(0, dim)]
    if packet == "layer_norm":
        x = nodes[v.args[0][1]] if v.args[0][0] == "n" else None
        shape = v.args[1][1] if len(v.args) > 1 and v.args[1][0] in ("c",) else None
        if shape is None and len(v.args) > 1 and v.args[1][0] == "l":
            shape = tuple(e[1] for e in v.args[1][1] if e[0] == "c")
        if x is None or x.shape != v.shape or shape is None or dim >= nd - len(tuple(shape)):
            return None
        if any(pos > 0 and nodes[i].dep for pos, i in tensors) or any(a[0] not in ("n", "c", "l") for a in v.args):
            return None
        return [(0, dim)]
    if v.target in ("aten.mean.dim", "aten.sum.dim_IntList"):
        # a reduction over other dims, keeping them (RMSNorm's mean of squares over the features)
        x = nodes[v.args[0][1]] if v.args[0][0] == "n" else None
        opts = dict(zip(("dims", "keepdim"), v.args[1:3]))
        dims = opts.get("dims")
        dims = tuple(e[1] for e in dims[1]) if dims is not None and dims[0] == "l" else None
        if (x is None or x.shape is None or len(x.shape) != nd or opts.get("keepdim") != ("c", True) or dims is None
                or any(a[0] not in ("n", "c", "l") for a in v.args)
                or not all(type(d) is int for d in dims) or dim in {d % nd for d in dims} or len(v.args) > 3
                or any(k != "dtype" for k, _ in v.kwargs)):
            return None
        return [(0, dim)]
    if packet in _ROW_BINARY and v.target.endswith(".Tensor"):
        plan = []
        for pos, i in tensors:
            shape = _shape_of(nodes[i], shapes, program)
            if shape is None or len(shape) > nd:
                return None
            d = dim - (nd - len(shape))
            if d < 0:
                continue  # broadcast: the operand has no such dim
            if shape[d] == v.shape[dim] or shape[d] == 1:  # type: ignore[index]
                plan.append((pos, d))
            else:
                return None
        return plan
    return None


def _random(node: Node) -> bool:
    """A random op (dropout in training mode included): its values are drawn at every call."""
    if node.op != "call" or _RANDOM.search(node.target) is None:
        return False
    if node.packet in ("dropout", "feature_dropout", "alpha_dropout") and len(node.args) == 3:
        return node.args[2] != ("c", False)
    return True


def _last_reads(program: Program) -> tuple[tuple[tuple[int, bool], ...], ...]:
    """``drop`` for :func:`forward`: at each node, the values it was the last reader of (not the output)."""
    last: dict[int, int] = {}
    for node in program.nodes:
        for r in node.refs:
            last[r] = node.index
    drop: list[list[tuple[int, bool]]] = [[] for _ in program.nodes]
    for r, at in last.items():
        if r != program.output:
            drop[at].append((r, False))
    return tuple(tuple(d) for d in drop)
