r"""Language-model targets and generation attribution (API §9, issue 17).

Targets are callables ``g(logits) -> (B,)`` on a model output of shape ``(B, T, V)`` (use
``functionalize(lm, output="logits", embedding=...)``); they are pure tensor code, so they work
under ``vmap`` over tokens and positions, and LRP seeds them with ``out * dg/dout`` (API §2):
relevance sums to the target for the linear ones (``next_token``, ``contrast``).

``generation`` attributes every token of a continuation to every earlier token in one vectorised
call: the rows are ``vmap``-ed over the continuation's positions, so the forward pass at x is
shared and only the backward passes are batched.
"""

from __future__ import annotations

import functools
import operator
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._types import ModelFn, Params
from .core import BoundModel, FunctionalModel, _Memo, inside_transform, is_concrete, keeps_graph
from .rewrite import forward, gradient_program, memoised, take_rows

__all__ = ["continuation", "contrast", "generation", "next_token"]


def _per_sample(value: Any, out: Tensor, name: str) -> Tensor:
    """An int or a (B,)/0-d integer tensor, as a (B,) long tensor on ``out``'s device."""
    t = torch.as_tensor(value, device=out.device)
    if t.is_floating_point() or t.ndim > 1:
        raise TypeError(f"{name} must be an int or a (B,) integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    rows = out.shape[0]
    if t.ndim == 1 and t.shape[0] != rows and t.shape[0] and rows % t.shape[0] == 0:
        t = t.repeat(rows // t.shape[0])  # a method folded copies of the batch into it (copies outermost)
    return t.long().expand(rows)


def _at(out: Tensor, position: Any, name: str = "position", low: int | None = None) -> Tensor:
    """``out[i, position_i]`` for every sample: the (B, V) logits at one position per sample. A position
    outside ``[low, T)`` (``low`` = -T: negative ones count from the end) is an error, not wrapped to
    another position."""
    if out.ndim != 3:
        raise ValueError(f"LM targets need logits of shape (B, T, V), got {tuple(out.shape)}; "
                         f"functionalize(lm, output='logits')")
    n = out.shape[1]
    low = -n if low is None else low
    if isinstance(position, (list, tuple)) or (not isinstance(position, (int, Tensor)) and getattr(position, "ndim", 0)):
        position = torch.as_tensor(position, device=out.device)  # a list or a numpy array
    elif not isinstance(position, (int, Tensor)) and hasattr(position, "__index__"):
        position = operator.index(position)  # a numpy integer
    if isinstance(position, int) and not isinstance(position, bool):
        if not low <= position < n:
            raise ValueError(f"{name} = {position} is outside the {n} positions of the logits (B, T, V) = "
                             f"{tuple(out.shape)}; expected {low} <= {name} < {n}")
    elif isinstance(position, Tensor) and is_concrete(position) and position.numel() and not position.is_floating_point():
        if bool(((position < low) | (position >= n)).any()):
            bad = position[(position < low) | (position >= n)].reshape(-1)[0].item()
            raise ValueError(f"{name} = {bad} is outside the {n} positions of the logits (B, T, V) = "
                             f"{tuple(out.shape)}; expected {low} <= {name} < {n}")
    pos = _per_sample(position, out, "position") % n
    index = pos.view(-1, 1, 1).expand(out.shape[0], 1, out.shape[2])
    return out.gather(1, index).squeeze(1)


def _pick(row: Tensor, token: Any) -> Tensor:
    tok = _per_sample(token, row, "token")
    return row.gather(1, tok.unsqueeze(1)).squeeze(1)


def next_token(token: Any, position: Any = -1, *, log_prob: bool = False) -> Callable[[Tensor], Tensor]:
    r"""The logit (or log-probability) of ``token`` predicted at ``position``.

    Args:
        token: The token id, an int or a ``(B,)`` tensor (one per sample).
        position: The position whose prediction is explained (the next token after it), an int
            (negative counts from the end) or a ``(B,)`` tensor (right-padded batches).
        log_prob: Explain :math:`\log p(token)` (a log-softmax over the vocabulary) instead of the logit.
    Returns:
        A target ``g(logits) -> (B,)``.
    """

    def on_row(row: Tensor) -> Tensor:
        return _pick(torch.log_softmax(row, -1) if log_prob else row, token)

    def target(out: Tensor) -> Tensor:
        return on_row(_at(out, position))

    return _reads_row(target, position, on_row)


def contrast(token: Any, foil: Any, position: Any = -1) -> Callable[[Tensor], Tensor]:
    """The logit difference ``token - foil`` at ``position`` (why this token rather than that one)."""

    def on_row(row: Tensor) -> Tensor:
        return _pick(row, token) - _pick(row, foil)

    def target(out: Tensor) -> Tensor:
        return on_row(_at(out, position))

    return _reads_row(target, position, on_row)


def _reads_row(target: Callable[[Tensor], Tensor], position: Any, on_row: Callable[[Tensor], Tensor]
               ) -> Callable[[Tensor], Tensor]:
    """``target`` marked with the one position it reads (an int), ``attrax_rows = (1, position, on_row)``:
    ``target(out) == on_row(out[:, position])``, so a gradient method may compute the LM head at that position
    only (``rewrite.gradient_program``)."""
    if isinstance(position, int) and not isinstance(position, bool):
        target.attrax_rows = (1, position, on_row)  # type: ignore[attr-defined]
    return target


def continuation(tokens: Tensor, start: Any) -> Callable[[Tensor], Tensor]:
    r"""The log-probability of a continuation: :math:`\sum_k \log p(t_k \mid t_{<k})`.

    Args:
        tokens: ``(n,)`` or ``(B, n)`` token ids of the continuation.
        start: The position of its first token in the sequence (int or ``(B,)``): token ``k`` is
            predicted at position ``start + k - 1``.
    """
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.ndim not in (1, 2):
        raise TypeError("tokens must be an integer tensor of shape (n,) or (B, n)")

    def target(out: Tensor) -> Tensor:
        toks = tokens.to(out.device)
        toks = toks.expand(out.shape[0], -1) if toks.ndim == 1 else toks
        s = _per_sample(start, out, "start")
        logp = torch.log_softmax(out, -1)
        total = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
        for k in range(toks.shape[1]):
            # token k is predicted at start + k - 1: a start of 0 (no prediction for the first token) or a
            # continuation longer than the logits is an error, not a wrap to other positions
            total = total + _pick(_at(logp, s + k - 1, "start + k - 1", 0),
                                  toks[:, k])
        return total

    return target


class _Replay(torch.autograd.Function):
    """The cached output of a shared forward, attached to the caller's inputs: its backward is a
    backward pass through the retained graph of that forward (the same kernels, so the same numbers
    as a fresh forward and backward)."""

    @staticmethod
    def forward(ctx: Any, entry: _Entry, *args: Tensor) -> Tensor:
        ctx.entry = entry
        return entry.out.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        leaves = ctx.entry.leaves
        want = [i for i, leaf in enumerate(leaves) if ctx.needs_input_grad[1 + i] and leaf.requires_grad]
        grads = torch.autograd.grad(ctx.entry.out, [leaves[i] for i in want], grad, retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        out: list[Tensor | None] = [None] * len(leaves)
        for i, g in zip(want, grads):
            out[i] = g
        return (None, *out)


class _Entry:
    """One forward kept with its graph: the inputs it was computed at and its output."""

    def __init__(self, key: Any, args: tuple[Tensor, ...], leaves: tuple[Tensor, ...], out: Tensor,
                 graph: bool = True) -> None:
        self.key, self.args, self.leaves, self.out, self.graph = key, args, leaves, out, graph
        # the kept inputs share memory (and version counters) with the caller's tensors: an input edited in
        # place after this forward (a method reusing its buffer) must not match the values it now shows
        self.versions = tuple(a._version for a in args)

    def matches(self, key: Any, args: tuple[Tensor, ...]) -> bool:
        if key != self.key or len(args) != len(self.args):
            return False
        if any(a._version != v for a, v in zip(self.args, self.versions)):
            return False
        return all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
                   for a, b in zip(args, self.args))


def _param_signature(params: Params) -> Any:
    """Which parameter tensors (storage, layout, version) a call sees: a parameter changed in place,
    or a different one, makes a new signature."""
    if not isinstance(params, dict):
        return id(params)
    return tuple((k, v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype, v._version) if isinstance(v, Tensor)
                 else (k, id(v)) for k, v in params.items())


def _plain(t: Any) -> bool:
    return type(t) in (Tensor, torch.nn.Parameter)


class _SharedForward:
    """Runs a model's forward once per distinct input and answers later calls at equal inputs (equal
    values, the same parameters and keyword arguments) from it: their gradients are backward passes
    through the kept graph. Only the first row's forwards are kept (at most ``capacity`` with their
    graph, so the memory is that of one separate call's forward, and two without: a method's probe
    of the output); calls it cannot answer run the model as usual,
    and so do calls under tracing (fake or proxy tensors, a dispatch mode, torch.func transforms)."""

    def __init__(self, capacity: int = 1, rows: tuple[int, tuple[int, int]] | None = None) -> None:
        self.capacity = capacity
        #: ``(dim, (start, stop))``: every forward returns these rows of the model's output only (the positions
        #: ``generation`` explains), so a traced program computes the head and last block's MLP on them alone
        self.rows = rows
        self.entries: list[_Entry] = []
        self.filling = True
        self.hits = 0

    def call(self, compute: Callable[..., Any], params: Params, args: tuple[Any, ...], kwargs: dict[str, Any],
             key: Any = None) -> Any:
        """``compute(params, args, kwargs)``, or its kept result; ``args`` are what gradients flow to."""
        names = tuple(sorted(kwargs))
        tensors = (*args, *(kwargs[k] for k in names if isinstance(kwargs[k], Tensor)))
        others = tuple((k, kwargs[k]) for k in names if not isinstance(kwargs[k], Tensor))
        if (not args or not all(_plain(a) for a in args) or not all(_plain(t) for t in tensors)
                or inside_transform() or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None):
            return compute(params, args, kwargs)
        try:
            key = (key, _param_signature(params), names, others)
            hash(key)
        except TypeError:
            return compute(params, args, kwargs)
        grad = torch.is_grad_enabled() and any(a.requires_grad for a in args)
        for entry in self.entries:
            if (entry.graph or not grad) and entry.matches(key, tensors):
                self.hits += 1
                return _Replay.apply(entry, *args) if grad else entry.out.detach()
        if not self.filling or sum(e.graph == grad for e in self.entries) >= (self.capacity if grad else 2):
            return compute(params, args, kwargs)
        if not grad:  # a forward without gradients (a method's probe of the output): kept without a graph
            out = compute(params, args, kwargs)
            if isinstance(out, Tensor) and not out.requires_grad:
                self.entries.append(_Entry(key, tuple(t.detach() for t in tensors), (), out, graph=False))
            return out
        leaves = tuple(a.detach().requires_grad_() if a.is_floating_point() else a for a in args)
        out = compute(params, leaves, kwargs)
        if not isinstance(out, Tensor) or not out.requires_grad:
            return compute(params, args, kwargs)  # nothing to share: the caller's own call
        entry = _Entry(key, tuple(t.detach() for t in tensors), leaves, out)
        self.entries.append(entry)
        return _Replay.apply(entry, *args)

    def take(self, out: Any) -> Any:
        """The rows of a model output this state keeps (all where it keeps all)."""
        if self.rows is None:
            return out
        dim, (start, stop) = self.rows
        if not isinstance(out, Tensor) or out.ndim <= dim or out.shape[dim] < stop:
            raise ValueError(f"generation explains positions {start}..{stop - 1} of the model's output along dim "
                             f"{dim}; it returned {getattr(out, 'shape', type(out).__name__)}")
        return take_rows(out, dim, (start, stop))

    @property
    def kept_graphs(self) -> int:
        return sum(e.graph for e in self.entries)


_SHARED_TYPES: dict[type, type] = {}


def _shared_type(cls: type) -> type:
    """A subclass of a FunctionalModel type whose ``run`` (every call of the module: direct calls, and
    bound ``additional_forward_args``) goes through the instance's ``_shared_state``."""
    if cls not in _SHARED_TYPES:
        def run(self: Any, module: Any, params: Params, x: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
            def compute(p: Params, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
                # the forward a gradient method would run the model with (rewrite.gradient_program: activations
                # written out in steps fused; the rows the state keeps, moved up past the ops computed row by
                # row), else the model itself
                rows = self._shared_state.rows
                fast = None if kw or inside_transform() else gradient_program(self._shared_base, p, args, rows=rows,
                                                                               count=True)
                if fast is not None:
                    out = forward(fast[0], p, args, drop=fast[1])[fast[0].output]
                    return out if fast[2] else self._shared_state.take(out)
                return self._shared_state.take(cls.run(self, module, p, args, kw or None))

            return self._shared_state.call(compute, params, tuple(x), dict(kwargs or {}), key=id(module))

        # program_gradients: gradient methods call this model_fn (its forwards are shared), not a program of it
        _SHARED_TYPES[cls] = type(cls.__name__, (cls,), {"run": run, "__module__": cls.__module__,
                                                         "program_gradients": False})
    return _SHARED_TYPES[cls]


def _share(model_fn: Any, state: _SharedForward) -> Any:
    """``model_fn`` whose forwards go through ``state``; ``None`` where that cannot be made transparently.

    A :class:`~attrax.core.FunctionalModel` becomes an instance of a subclass that shares its
    attributes (its traced-program memo, shadow module and lock), so rule-based methods see the same
    model. A plain function is wrapped.
    """
    if isinstance(model_fn, FunctionalModel) and not isinstance(model_fn, BoundModel):
        obj = object.__new__(_shared_type(type(model_fn)))
        obj.__dict__.update(model_fn.__dict__)
        obj._shared_state = state
        obj._shared_base = model_fn
        if state.rows is not None:
            # this model returns some rows of the output only, another function than model_fn's: programs traced
            # from it (a rule or layer method run with strategy="shared") are kept apart from model_fn's, in a memo
            # of their own per rows (a program of the whole output read at a row's relative position was wrong)
            obj._programs = memoised(model_fn, ("rows memo", state.rows), lambda: _Memo(model_fn.memo_size))
        return obj
    if isinstance(model_fn, (types.FunctionType, functools.partial, types.MethodType)):
        def shared(params: Params, *x: Any, **kwargs: Any) -> Any:
            return state.call(lambda p, args, kw: state.take(model_fn(p, *args, **kw)), params, x, kwargs)

        return shared
    return None


STRATEGIES = ("auto", "shared", "vmap")
_OWN_PROGRAM = ("attrax.lrp", "attrax.deeplift")


def _runs_own_program(attribute: Any) -> bool:
    """An attrax method that runs the model through its own traced program (LRP, DeepLift and their
    relatives): ``model_fn`` is not differentiated, so only ``vmap`` shares its forward."""
    while isinstance(attribute, functools.partial):
        attribute = attribute.func
    return getattr(attribute, "__module__", None) in _OWN_PROGRAM


def generation(
    attribute: Callable[..., Tensor],
    model_fn: ModelFn,
    params: Params,
    x: Tensor,
    continuation_ids: Tensor,
    *,
    start: int,
    log_prob: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
    **method_kwargs: Any,
) -> Tensor:
    r"""Attribution of every continuation token to every token of the sequence, ``(B, n_new, T)``.

    ``x`` is the embedding of the whole sequence (prompt and continuation, ``(B, T, D)``), and
    ``continuation_ids`` the ``(B, n_new)`` (or ``(n_new,)``) ids of the tokens at positions
    ``start, start + 1, ...``. Row ``k`` is ``attribute(model_fn, params, x, next_token(tok_k,
    start + k - 1)).sum(-1)``: the relevance of each position for predicting token ``k``. The rows
    share the forward pass at ``x`` (for IG: at every step of the path), and only the backward passes
    differ. Positions at or after ``start + k`` get zero in a causal model.

    Two ways to share it (``strategy``):

    * ``"shared"``: the rows are computed one after the other, with a ``model_fn`` that keeps the
      graph of the first row's forward and answers every later call at equal inputs (equal values,
      the same parameters) with a backward pass through it. For a plain function the rows are the separate
      calls' numbers bitwise (the same kernels run on the same values); a ``FunctionalModel``'s separate
      calls compute its LM head at their one position only (``rewrite.gradient_program``), equal to the
      shared rows to the head's rounding. Methods that differentiate ``model_fn``
      with autograd (gradient, input x gradient, IG, ...) share it; others just run as separate calls.
    * ``"vmap"``: all rows at once with ``torch.func.vmap`` over the continuation's positions
      (``chunk_size`` rows at a time): the forward is not batched, the backward passes are. This is
      what shares LRP's forward (its own traced program runs the model, not ``model_fn``).
    * ``"auto"`` (default): ``"vmap"`` for the methods of ``attrax.lrp`` and ``attrax.deeplift``, and
      inside ``torch.func`` transforms, ``torch.compile`` or ``value_and_attribution``. Otherwise row 0
      with ``"shared"``; if the method's forward was kept there, the other rows with ``"shared"`` too,
      else with ``"vmap"``.

    Either way the rows run through ``model_fn`` returning the explained positions' rows of its output only
    (``start - 1 .. start + n_new - 2``; row ``k``'s target reads row ``k`` of them): for a ``FunctionalModel`` a
    traced program then computes the head, the final norm and the last block's MLP on those ``n_new`` rows, not
    all ``T``, in the shared forward and in every backward pass (``rewrite.select_pushdown``), and LRP's program
    does the same. Programs traced from that model are kept apart from ``model_fn``'s own.

    Measured on CPU (benchmarks/bench_generation.py, batch 1, seq 128, 16 new tokens, 4-layer HF
    models): the vmapped backward passes of IG's steps (a ``(16, 32 steps, T, V)`` cotangent) ran at
    twice the time of the same backward passes one after the other, so IG takes ``"shared"``; LRP's
    single-sample backward passes vmap well.

    Args:
        attribute: Any attrax method (``ax.integrated_gradients``, ``ax.lrp`` with
            ``composite=ax.composites.attn_lrp()``, ``ax.deeplift``, ...).
        start: Position of the first continuation token (> 0).
        log_prob: Explain log-probabilities instead of logits.
        strategy: ``"auto"``, ``"shared"`` or ``"vmap"`` (above).
        chunk_size: Rows per vmapped batch (``"vmap"``); ``None``: all.
        method_kwargs: Passed to ``attribute`` (``additional_forward_args``, ``composite``, ...).
    Returns:
        A ``(B, n_new, T)`` tensor.
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(f"x must be the sequence's embedding of shape (B, T, D), got {getattr(x, 'shape', x)}")
    if not isinstance(start, (int, bool)) and getattr(start, "ndim", 0) == 0:
        try:
            start = operator.index(start)  # a numpy or 0-d integer tensor position (not a float: no rounding)
        except TypeError:
            pass
    if not isinstance(start, int) or isinstance(start, bool) or not 0 < start < x.shape[1] + 1:
        raise ValueError(f"start must be an int position in (0, {x.shape[1]}], got {start!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    ids = torch.as_tensor(continuation_ids, device=x.device)
    ids = ids.expand(x.shape[0], -1) if ids.ndim == 1 else ids
    n = ids.shape[1]
    if start + n - 1 > x.shape[1]:
        raise ValueError(f"a continuation of {n} tokens from position {start} does not fit a sequence of {x.shape[1]}")
    positions = torch.arange(start - 1, start - 1 + n, device=x.device)
    if strategy != "vmap" and (inside_transform() or torch.compiler.is_compiling() or keeps_graph()):
        strategy = "vmap"
    if strategy == "auto" and _runs_own_program(attribute):
        strategy = "vmap"

    def row(fn: ModelFn, pos: Any, tok: Tensor) -> Tensor:
        return attribute(fn, params, x, next_token(tok, pos, log_prob=log_prob), **method_kwargs).sum(-1)

    # every row reads the explained positions' rows of the output only (row k's target reads row k of them),
    # through a model returning those rows: a traced program then runs the head and last block's MLP on n rows,
    # not T (the shared forward and every backward pass of IG; LRP's program under vmap)
    state = _SharedForward(rows=(1, (start - 1, start - 1 + n)))
    # (inside value_and_attribution the model's output at x is part of the result: the whole one, as the user's)
    shared = None if keeps_graph() else _share(model_fn, state)
    if shared is None and strategy == "shared":
        raise TypeError(f"strategy='shared' needs a FunctionalModel or a function as model_fn, got {type(model_fn)}")
    sliced, offset = (model_fn, 0) if shared is None else (shared, start - 1)

    def vmapped(first: int) -> Tensor:
        state.filling = False  # (calls under vmap run the model anyway)
        with warnings.catch_warnings():
            # torch has no batching rule for the fused attention backward yet: its fallback is exact, only slower
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            # randomness="different": a sampling method draws per row, as separate calls would (the default
            # "error" mode refused smoothgrad, noise_tunnel, gradient_shap, shapley sampling: found in review)
            return torch.func.vmap(functools.partial(row, sliced), in_dims=(0, 1), chunk_size=chunk_size,
                                   randomness="different")(positions[first:] - offset, ids[:, first:])  # (n - first, B, T)

    if strategy == "vmap" or shared is None:
        return vmapped(0).transpose(0, 1)
    rows = [row(shared, 0, ids[:, 0])]
    state.filling = False
    if strategy == "auto" and not state.kept_graphs:
        return torch.cat([rows[0].unsqueeze(1), vmapped(1).transpose(0, 1)], 1) if n > 1 else rows[0].unsqueeze(1)
    rows += [row(shared, k, ids[:, k]) for k in range(1, n)]
    state.entries.clear()
    return torch.stack(rows, 1)
