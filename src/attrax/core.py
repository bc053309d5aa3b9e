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
import copy
import itertools
import numbers
import operator
import sys
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._types import ModelFn, Params, TensorOrTuple  # noqa: F401 - ModelFn re-exported (distributed)

__all__ = ["FunctionalModel", "functionalize"]


class FunctionalModel:
    """``model_fn(params, *x)`` for a module, as returned by :func:`functionalize`.

    Calls the module with ``torch.func.functional_call``, so the tensors in
    ``params`` (not the module's own) are used and gradients with respect to
    them are exact. The user's module is never changed, not even for the
    duration of a call: ``functional_call`` swaps tensors into a private
    *shadow* of the module tree (each submodule shallow-copied, sharing its
    tensors, hooks and attributes), so another thread calling the module
    itself never sees swapped tensors. A lock makes concurrent calls of the
    shadow safe.

    The object also memoises the traced graphs that rule-based methods need
    (see :mod:`attrax.rewrite`), keyed on :meth:`fingerprint`, which changes
    whenever anything that can change a trace changes: the module tree and its
    types, non-tensor attributes (flags, slopes, configs), plain tensor
    attributes, hooks and training flags. A memo therefore never outlives the
    model it was traced from; it holds at most ``memo_size`` entries.
    """

    memo_size = 16

    def __init__(self, module: nn.Module, output: Any = None, embedding: str | None = None) -> None:
        self.module = module
        self.output = output
        self.embedding = embedding
        self._lock = threading.RLock()
        self._programs: _Memo = _Memo(self.memo_size)
        self._shadow: tuple[Any, nn.Module, dict[str, Tensor]] | None = None
        self._injected = _Injected()

    def fingerprint(self) -> Any:
        """A hashable summary of everything about the module that can change its traced graph. Within one call
        of a method (:func:`one_fingerprint`) it is computed once."""
        scope = _CALL_FINGERPRINTS.get()
        if scope is None:
            return self._fingerprint_now()
        hit = scope.get(id(self))
        if hit is None:
            hit = scope[id(self)] = (self, self._fingerprint_now())  # self held: its id stays this model's
        return hit[1]

    def derived(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once per fingerprint: what follows from the module's structure alone (its
        parameter names, training flags)."""
        fp = self.fingerprint()
        memo = self.__dict__.get("_derived")
        if memo is None or memo[0] is not fp:
            memo = self.__dict__["_derived"] = (fp, {})
        table = memo[1]
        if key not in table:
            table[key] = compute()
        return table[key]

    def _fingerprint_now(self) -> Any:
        """The last fingerprint where nothing it was computed from changed since (``_Watch``), else a new one."""
        last = self.__dict__.get("_watched")
        if last is not None and last[1].unchanged():
            return last[0]
        watch = _Watch()
        fp = self._interned(module_fingerprint(self.module, watch))
        # kept only if the model read again after the watch took its state gives the same fingerprint (another
        # thread may change the module meanwhile): the state is then one this fingerprint is right for
        keep = False
        if watch.valid:
            watch.seal()
            keep = module_fingerprint(self.module) == fp
        self.__dict__["_watched"] = (fp, watch) if keep else None
        return fp

    def _interned(self, fp: Any) -> Any:
        """``fp``, or the equal fingerprint this model returned last time: memo keys holding the same object
        compare by identity (a fingerprint is a tuple of thousands of items, compared at every lookup)."""
        last = self.__dict__.get("_last_fingerprint")
        if last is not None and last == fp:
            return last
        self.__dict__["_last_fingerprint"] = fp
        return fp

    def embed(self, params: Params, ids: Tensor) -> Tensor:
        """The output of the ``embedding`` layer for token ``ids`` (what ``model_fn`` takes as x)."""
        if self.embedding is None:
            raise ValueError("model_fn.embed needs functionalize(module, embedding='<layer path>')")
        layer = self.module.get_submodule(self.embedding)
        prefix = self.embedding + "."
        sub = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        with self._lock:
            copy_ = shadow_copy(layer)  # never swap tensors in the user's module
            return torch.func.functional_call(copy_, sub, (ids,), strict=False)

    def run(self, module: nn.Module, params: Params, x: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Tensor:
        """``functional_call`` of ``module`` (the shadow) on ``x``: with ``embedding``, x[0] is the embedding
        layer's output, injected in place of the layer's forward while dummy ids of its shape enter the
        model; with ``output``, the selected tensor of the result."""
        if self.embedding is None:
            out = torch.func.functional_call(module, dict(params), x, kwargs or None, strict=False)
            return out if self.output is None else select_output(out, self.output)
        e = x[0]
        if isinstance(e, Tensor) and not e.is_floating_point():
            raise TypeError(f"functionalize(..., embedding={self.embedding!r}): model_fn takes that layer's output "
                            f"(B, T, D), got a {e.dtype} tensor of shape {tuple(e.shape)}: pass "
                            f"model_fn.embed(params, ids), or functionalize without embedding= for a model on ids")
        real = (kwargs or {}).get("input_ids")
        if isinstance(real, Tensor):  # the real ids, bound by the caller: the model reads them wherever it does
            kwargs = {k: v for k, v in kwargs.items() if k != "input_ids"}  # type: ignore[union-attr]
            if real.shape != e.shape[:-1]:
                raise ValueError(f"additional_forward_args input_ids of shape {tuple(real.shape)} does not match "
                                 f"the embedding layer's output {tuple(e.shape)}: ids need shape {tuple(e.shape[:-1])}")
            ids = real
        else:
            ids = self._dummy_ids(e, x[1:], kwargs)
        x = (ids, *x[1:])
        if module is self.module:
            if not torch.compiler.is_compiling():  # a compiled caller broke its graph before this call
                with self._lock:
                    return self.run(self.shadow(), params, (e, *x[1:]), kwargs)
            # compiled code runs the module itself, so dynamo's guards cover all it reads (a shadow copy would
            # hide a later change from them); its embedding layer answers through its instance dict for this
            # call only, which dynamo applies to the trace and leaves unchanged in the module (set, then popped).
            # The answer is a holder of this call's own (the shadow's holder is the eager calls', which other
            # threads use), and it answers only this call's dummy ids: after a graph break inside the model
            # (fullgraph=False) the rest runs eagerly with the entry in place, and another thread calling the
            # module meanwhile gets its own forward
            layer = module.get_submodule(self.embedding)
            check_compiled_embedding(self)
            injection = _CallInjection(layer, e, ids)
            layer.__dict__["forward"] = injection.read
            try:
                out = torch.func.functional_call(module, dict(params), x, kwargs or None, strict=False)
            finally:
                layer.__dict__.pop("forward", None)
            calls = injection.calls
        else:
            self._injected.value, self._injected.calls = e, 0
            try:
                out = torch.func.functional_call(module, dict(params), x, kwargs or None, strict=False)
            finally:
                # held for the call only: a transform's wrapped tensor kept past it would escape a compiled graph
                # (aot_autograd: "Cannot access storage of TensorWrapper") and keep the input alive
                self._injected.value = None
            calls = self._injected.calls
        if calls == 0:  # x never reached the model: every attribution would be 0
            raise EmbeddingMisuse(
                f"functionalize(..., embedding={self.embedding!r}): the model's forward never called that layer, so "
                f"model_fn's input does not reach the output; name the embedding layer the forward calls (e.g. the "
                f"encoder's own 'embed_tokens' where a shared one is only tied to it)")
        return out if self.output is None else select_output(out, self.output)

    def _dummy_ids(self, e: Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Tensor:
        """The token ids the module is called with while its embedding layer answers ``e``: one non-pad id
        everywhere, and the pad id where a bound ``attention_mask`` of shape (B, T) is 0. Models that read the
        ids again past the embedding only to find padding (RoBERTa's position ids, a sequence classification
        head's last non-pad token) then see what the real ids would show them; :func:`check_embedding_ids`
        refuses models that read more of them."""
        pad, fill, _, mask_at = self._id_facts()
        probe = None if torch.compiler.is_compiling() else _PROBE_IDS.get()
        if probe is not None and probe[0] is self:
            ids = probe[1](e.shape[:-1]).to(e.device)
        else:
            # (zeros plus the id: torch.full takes no symbolic sizes, which export traces with)
            ids = torch.zeros(e.shape[:-1], dtype=torch.long, device=e.device) + fill
        mask = (kwargs or {}).get("attention_mask")
        if mask is None and mask_at is not None and len(rest) > mask_at:
            mask = rest[mask_at]
        if pad is None or not isinstance(mask, Tensor):
            return ids
        if mask.shape == ids.shape:
            return torch.where(mask == 0, torch.full_like(ids, pad), ids)
        if mask.ndim == 4 and mask.shape[0] == ids.shape[0] and mask.shape[-1] == ids.shape[-1]:
            # (B, 1 or heads, T, T), True/0 where a query may attend: a pad is a key no query may attend
            seen = mask if mask.dtype == torch.bool else (
                mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask != 0)
            return torch.where(seen.any(-2).any(1), ids, torch.full_like(ids, pad))
        return ids

    def _id_facts(self) -> tuple[int | None, int, int | None, int | None]:
        """``(pad id, the non-pad id the module gets, vocabulary size, position of attention_mask among the
        arguments after the ids)``, from the model's config and embedding layer (read at every call: a changed
        ``config.pad_token_id`` counts) and forward's signature (once)."""
        mask_at = self.__dict__.get("_mask_at", False)
        if mask_at is False:
            import inspect

            try:
                names = list(inspect.signature(type(self.module).forward).parameters)[2:]
            except (TypeError, ValueError):
                names = []
            mask_at = self.__dict__["_mask_at"] = names.index("attention_mask") if "attention_mask" in names else None
        layer = self.module.get_submodule(self.embedding)
        config = getattr(self.module, "config", None)
        pad = getattr(config, "pad_token_id", None)
        pad = getattr(layer, "padding_idx", None) if not _token_id(pad) else pad
        pad = pad if _token_id(pad) else None
        vocab = getattr(layer, "num_embeddings", None) or getattr(config, "vocab_size", None)
        special = set(special_ids(config))
        fill = next(i for i in range(len(special) + 2) if i not in special and i != pad)
        return pad, fill, vocab if isinstance(vocab, int) else None, mask_at

    def shadow(self, fingerprint: Any = None) -> nn.Module:
        """The private copy of the module tree that calls run on (rebuilt when the module changed)."""
        return self._shadow_state(fingerprint)[1]

    def _shadow_state(self, fingerprint: Any = None) -> tuple[Any, nn.Module, dict[str, Tensor]]:
        """``(fingerprint, shadow, buffers of modules in training mode)``, rebuilt when the module changed."""
        fp = self.fingerprint() if fingerprint is None else fingerprint
        with self._lock:
            if self._shadow is None or self._shadow[0] != fp:
                shadow = shadow_copy(self.module)
                if self.embedding is not None:
                    # the shadow's embedding layer returns the tensor the call injects (a private copy: the
                    # user's layer is untouched); its parameters stay where they are (tied weights work)
                    layer = shadow.get_submodule(self.embedding)
                    layer.forward = self._injected.read
                    # its forward hooks ran in embed(), on the value injected: not again (each hook dict is the
                    # user's, shared by the shallow copy; the copy gets empty ones)
                    layer._forward_hooks, layer._forward_hooks_with_kwargs = OrderedDict(), OrderedDict()
                    layer._forward_hooks_always_called = OrderedDict()
                training = {f"{path}.{k}" if path else k: b for path, m in shadow.named_modules() if m.training
                            for k, b in m._buffers.items() if b is not None}
                self._shadow = (fp, shadow, training)
            return self._shadow

    def __call__(self, params: Params, *x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return self.run(self.module, params, x)  # (run injects the embedding for this call)
        with self._lock:
            _, shadow, training = self._shadow_state()
            params = dict(params)
            if training and not keeps_graph():
                # modules in training mode write their buffers (BatchNorm running stats): give them copies,
                # so attribution never changes the model (value_and_attribution, for training, keeps the writes)
                params.update({k: params.get(k, b).clone() for k, b in training.items()})
            return self.run(shadow, params, x)

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self.module).__name__})"


def check_compiled_embedding(model_fn: Any) -> None:
    """Compiled calls run the user's module, whose embedding layer's forward hooks would run again on the output
    model_fn takes (``embed()`` ran them): refused (``ax.compile`` asks before compiling, for a plain error)."""
    inner = getattr(model_fn, "inner", model_fn)
    if not isinstance(inner, FunctionalModel) or getattr(inner, "embedding", None) is None:
        return
    layer = inner.module.get_submodule(inner.embedding)
    if layer._forward_hooks or layer._forward_hooks_with_kwargs:
        raise ValueError(f"the embedding layer {inner.embedding!r} has forward hooks: compiled, they would run "
                         f"again on the output model_fn takes (embed() ran them); remove them, or call eagerly")


#: ``(model, draw(shape) -> ids)`` while :func:`check_embedding_ids` calls the model with other ids
_PROBE_IDS: contextvars.ContextVar[Any] = contextvars.ContextVar("attrax_probe_ids", default=None)


def check_embedding_ids(model_fn: Any, params: Params, xs: tuple[Tensor, ...]) -> None:
    """Refuse a ``functionalize(..., embedding=...)`` model whose output depends on the token ids past its
    embedding layer in a way the made-up ids cannot show, unless the caller bound the real ones
    (``additional_forward_args={"input_ids": ids}``). Once per fingerprint: the module, with its own parameters,
    runs on one random embedding row of x's shape with the made-up ids and with two draws of random ids (the
    model's special tokens among them); a different output means the model reads the ids themselves (CLIP's
    pooling at the largest id, ESM's mask tokens), and every method would explain another function. Runs on
    concrete values of its own, so also under torch.func transforms; not in compiled code (ax.compile checks
    before compiling) nor in training mode (dropout would differ anyway)."""
    inner = getattr(model_fn, "inner", model_fn)
    if not isinstance(inner, FunctionalModel) or getattr(inner, "embedding", None) is None:
        return
    if torch.compiler.is_compiling() or isinstance(getattr(model_fn, "kwargs", {}).get("input_ids"), Tensor):
        return
    if not xs or not isinstance(xs[0], Tensor) or xs[0].ndim < 2:
        return
    if not is_concrete() or not all(type(d) is int for d in xs[0].shape):
        return  # export / make_fx tracing: symbolic values only (the eager calls check)
    if inner.derived("ids_checked", lambda: [False])[0] or any(m.training for m in inner.module.modules()):
        return
    pad, fill, vocab, _ = inner._id_facts()
    if vocab is None or vocab < 3:
        return
    config = getattr(inner.module, "config", None)
    # the model's special tokens (a mask token, an eos); the pad id too where it is also one of them (pad = eos, as
    # LM classifiers are often set up): then it is a real token inside the text, which made-up ids cannot place
    special = sorted(v for v in special_ids(config, ("bos_token_id", "eos_token_id", "mask_token_id", "sep_token_id",
                                                    "cls_token_id", "unk_token_id")) if 0 <= v < vocab)

    def draws(flip: bool, last: int | None = None) -> Callable[[torch.Size], Tensor]:
        def draw(shape: torch.Size) -> Tensor:  # random ids with the special tokens first; reversed; one token last
            ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
            ids = torch.where(ids == pad, torch.full_like(ids, fill), ids) if pad is not None else ids
            n = min(len(special), shape[-1] - 1) if len(shape) else 0
            if n > 0:
                ids[..., :n] = torch.tensor(special[:n])
            ids = ids.flip(-1) if flip else ids
            if last is not None:
                ids[..., -1] = last
            return ids
        return draw

    module = inner.module
    own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    x = xs[0]
    with torch.no_grad(), torch._C._DisableFuncTorch():
        row = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(0)).to(x.dtype)
        outs = []
        for draw in (None, draws(False), draws(True), *(draws(False, v) for v in special)):
            token = _PROBE_IDS.set(None if draw is None else (inner, draw))
            try:
                outs.append(inner(own, row))
            except EmbeddingMisuse:
                raise
            except Exception as error:  # noqa: BLE001 - made-up ids broke the model: it reads them
                outs.append(error)
            finally:
                _PROBE_IDS.reset(token)
    if all(isinstance(o, Exception) for o in outs) or isinstance(outs[0], TypeError):
        return  # the module cannot run on its own here (a required mask, an op vmap has no rule for around it)
    if all(isinstance(o, Tensor) for o in outs) and all(torch.equal(outs[0], o) for o in outs[1:]):
        inner.derived("ids_checked", lambda: [False])[0] = True
        return
    failed = next((o for o in outs if isinstance(o, Exception)), None)
    how = (f"it failed on made-up ids: {type(failed).__name__}: {str(failed)[:200]}" if failed
           else "its output changed with the ids while the layer output was held")
    raise ValueError(
        f"functionalize(..., embedding={inner.embedding!r}): this model reads the token ids again past that "
        f"layer ({how}), "
        f"and model_fn, which takes the layer's output, only has made-up ids for it (one non-pad token; the pad "
        f"token where attention_mask is 0): every method would explain another function. Pass the real ids: "
        f"additional_forward_args={{'input_ids': ids, ...}} (repeated with x wherever a method folds steps or "
        f"perturbations), or attribute the ids with a layer method on the full model, e.g. "
        f"ax.layer.integrated_gradients(*ax.functionalize(lm, output=...), ids, target, layer={inner.embedding!r})"
    ) from failed


def _token_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def special_ids(config: Any, keys: tuple[str, ...] = ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id",
                                                      "sep_token_id", "cls_token_id", "unk_token_id")) -> list[int]:
    """The token ids a model's config names under ``keys`` (a list of eos ids too, as Llama 3 configs have)."""
    out: list[int] = []
    for k in keys:
        v = getattr(config, k, None)
        for e in (v if isinstance(v, (list, tuple)) else (v,)):
            if _token_id(e) and e not in out:
                out.append(e)
    return out


class _Injected:
    """Holds the tensor a shadow's embedding layer returns during one call (once: a layer an encoder and a
    decoder share, T5's, would hand the decoder the encoder's input)."""

    value: Any = None
    calls = 0

    def read(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise EmbeddingMisuse(_CALLED_TWICE)
        return self.value


class EmbeddingMisuse(ValueError):
    """The ``embedding=`` layer is not called exactly once in a forward."""


_CALLED_TWICE = ("functionalize(..., embedding=...): the embedding layer is called more than once in one forward (an "
                 "encoder and a decoder sharing it, as T5 does): model_fn's input can replace one call only. Name a "
                 "layer called once (e.g. 'encoder.embed_tokens' after giving the encoder a module of its own), or "
                 "explain the ids with a layer method on the full model")


class _CallInjection:
    """What the user's embedding layer returns during one compiled call: ``value`` for that call's dummy ``ids``;
    any other caller (run eagerly after a graph break) gets the layer's own forward."""

    def __init__(self, layer: nn.Module, value: Tensor, ids: Tensor) -> None:
        self.layer, self.value, self.ids, self.calls = layer, value, ids, 0

    def read(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or (args and args[0] is self.ids):
            self.calls += 1
            if self.calls > 1:
                raise EmbeddingMisuse(_CALLED_TWICE)
            return self.value
        return type(self.layer).forward(self.layer, *args, **kwargs)


def select_output(out: Any, output: Any) -> Tensor:
    """The tensor ``output`` names in a model's result: a key or attribute (``"logits"``), an index, or a callable."""
    if callable(output):
        return output(out)
    if isinstance(output, str):
        if isinstance(out, Mapping) and output in out:
            return out[output]
        if hasattr(out, output):
            return getattr(out, output)
        keys = list(out.keys()) if isinstance(out, Mapping) else [k for k in vars(out)] if hasattr(out, "__dict__") else []
        raise ValueError(f"output={output!r} is not in the model's result ({type(out).__name__} with {keys})")
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        items = out.to_tuple() if hasattr(out, "to_tuple") else out
        if not -len(items) <= output < len(items):
            raise ValueError(f"output={output} is out of range for a result with {len(items)} entries")
        return items[output]
    raise TypeError(f"output={output!r} needs a tuple-like result, got {type(out).__name__}")


class _Memo(dict):  # type: ignore[type-arg]
    """A dict that keeps only its ``size`` most recently inserted entries."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __setitem__(self, key: Any, value: Any) -> None:
        self.pop(key, None)
        super().__setitem__(key, value)
        while len(self) > self.size:
            del self[next(iter(self))]

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]


_STRUCTURAL = frozenset(("_parameters", "_buffers", "_modules"))
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
            torch.memory_format)


#: how deep attribute values (nested dicts, lists, config objects) are fingerprinted by content; below it by identity
#: (a reviewer's value four levels down, ``self.cfg["a"]["b"]["c"]["d"]``, changed and the old program was served)
_ATTR_DEPTH = 8


def _value_key(v: Any, depth: int, seen: dict[int, Any], refs: list[Any], watch: _Watch | None = None) -> Any:
    """What about attribute value ``v`` can change a trace: scalars by value, tensors by identity and
    version, containers and plain objects (configs) by their items, other objects by identity.
    Every object keyed by identity is appended to ``refs``, which the fingerprint keeps alive, so
    an identity is never reused by another object while a memo entry holds the key. ``watch``, if
    given, is told every mutable thing read (:class:`_Watch`)."""
    if isinstance(v, _SCALARS):
        return v
    refs.append(v)
    if isinstance(v, Tensor):
        if watch is not None:
            watch.tensors.append(v)
        digest = _digest(v)
        if digest is not None and watch is not None:
            watch.contents.append((v, digest))
        return ("T", id(v), v._version, _storage_key(v), digest)
    if type(v).__module__ == "numpy" and hasattr(v, "nbytes") and hasattr(v, "tobytes"):
        digest = _digest(v)
        if digest is not None and watch is not None:
            watch.contents.append((v, digest))
        return ("A", id(v), digest)
    if isinstance(v, nn.Module):  # a module outside the tree (kept in a plain list): its and its children's settings
        parts = []
        for m in v.modules():
            if watch is not None:
                watch.typed.append(m)
                watch.mapping(vars(m))
                watch.mapping(m._modules)
            refs.append(m)
            parts.append((id(m), type(m), tuple((k, e) for k, e in vars(m).items() if type(e) in _SCALAR_TYPES)))
        return ("M", tuple(parts))
    if type(v) is types.FunctionType and depth > 0 and not (v.__module__ or "").startswith("torch"):
        # a helper a forward calls (a module-level GELU, a mask builder): its code and the globals it names, as for
        # forward itself, so a module-level value it reads (a constant, a flag) is part of the key
        if ("F", id(v)) in seen:  # a helper reached again (or calling itself): keyed once
            return seen[("F", id(v))]
        seen[("F", id(v))] = ("F", id(v))
        code, globs = v.__code__, v.__globals__
        names = tuple(n for n in code.co_names if n in globs and not _is_module_object(globs[n])
                      and not isinstance(globs[n], type))
        if watch is not None:
            watch.functions.append((v, code, globs, names, tuple(map(globs.get, names))))
        refs.append(code)
        # numbers, strings and flags by value, other helpers in turn (to any depth: outer -> middle -> inner ->
        # a module constant was served stale at depth 3, found in review); other objects (registries, loggers) by
        # identity only: walking them would cost every call its watch (a non-dict mapping makes it invalid)
        out = ("F", id(v), id(code), tuple((n, _helper_global(globs[n], depth - 1, seen, refs, watch)) for n in names),
               _named_settings(code.co_names, globs, seen, refs, watch))
        seen[("F", id(v))] = out
        return out
    if callable(v) or depth <= 0:
        return ("O", id(v))
    key = id(v)
    if key in seen:
        return seen[key]
    seen[key] = ("O", key)  # cycles
    if isinstance(v, (tuple, list)):
        if watch is not None and type(v) is not tuple:
            watch.sequence(v)
        out: Any = (type(v).__name__, tuple(_value_key(e, depth - 1, seen, refs, watch) for e in v))
    elif isinstance(v, (set, frozenset)):
        if watch is not None and type(v) is not frozenset:
            watch.sequence(v)
        out = ("set", tuple(sorted(repr(_value_key(e, depth - 1, seen, refs, watch)) for e in v)))
    elif isinstance(v, Mapping):
        if watch is not None:
            watch.mapping(v)
        out = ("map", tuple((repr(k), _value_key(e, depth - 1, seen, refs, watch)) for k, e in v.items()))
    elif hasattr(v, "__dict__"):
        if watch is not None:
            watch.typed.append(v)
            watch.mapping(vars(v))
        out = (type(v), key, tuple((k, _value_key(e, depth - 1, seen, refs, watch)) for k, e in vars(v).items()))
    elif getattr(type(v), "__slots__", None):  # slotted objects (dataclass(slots=True) configs)
        if watch is not None:
            watch.valid = False
        names = [n for cls in type(v).__mro__ for n in getattr(cls, "__slots__", ()) if hasattr(v, n)]
        out = (type(v), key, tuple((n, _value_key(getattr(v, n), depth - 1, seen, refs, watch)) for n in names))
    else:
        out = ("O", key)
    seen[key] = out
    return out


#: plain tensors and arrays up to this size are read by content (a forward that casts one bakes a copy into the program,
#: and an edit through ``.data`` or a numpy view bumps no version counter); larger ones by identity and version
_CONTENT_BYTES = 1 << 16


def _digest(v: Any) -> Any:
    """What a small CPU tensor (:func:`_content_key`) or numpy array (its bytes) holds; None for others: larger,
    on a device, fake, wrapped."""
    try:
        if isinstance(v, Tensor):
            if v.device.type != "cpu" or v.requires_grad or v.numel() * v.element_size() > _CONTENT_BYTES:
                return None
            return _content_key(v)
        if v.nbytes > _CONTENT_BYTES or v.dtype.hasobject:
            return None
        return (v.shape, v.dtype.str, v.tobytes())
    except Exception:  # noqa: BLE001 - anything unusual is read by identity, as before
        return None


def _read(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except (AttributeError, ValueError):  # (an empty closure cell raises ValueError)
        return _MISSING


_MISSING = object()
#: packages whose modules and classes a forward names for their functions (torch.relu, F.gelu), not settings
_LIBRARIES = frozenset(("torch", "numpy", "transformers", "attrax", "einops", "scipy", "typing", "functools"))


def _library(module_name: str | None, stdlib: bool = True) -> bool:
    """A module (by its dotted name) of a library's (or, with ``stdlib``, the standard library's), not the user's."""
    root = (module_name or "builtins").split(".")[0]
    return root in _LIBRARIES or (stdlib and root in sys.stdlib_module_names)


def _named_settings(names: tuple[str, ...], globs: dict[str, Any], seen: dict[Any, Any], refs: list[Any],
                    watch: _Watch | None) -> tuple[Any, ...]:
    """Attributes of the config modules and classes a function names (``config.SCALE``, ``Cfg.SCALE``): for every
    module-level name among ``names`` that is a module or class of the user's (not a library's), the plain values of its
    attributes named in ``names`` too."""
    out = []
    for n in names:
        g = globs.get(n)
        if not isinstance(g, (types.ModuleType, type)):
            continue
        if _library(g.__name__ if isinstance(g, types.ModuleType) else getattr(g, "__module__", None)):
            continue
        for a in names:
            v = _read(g, a)
            if v is _MISSING or not (type(v) in _SCALAR_TYPES or type(v) in (dict, list, tuple)):
                continue
            if watch is not None:
                watch.reads.append((g, a, v))
            out.append((n, a, _value_key(v, _ATTR_DEPTH, seen, refs, watch)))
    return tuple(out)


def _helper_global(v: Any, depth: int, seen: dict[Any, Any], refs: list[Any], watch: _Watch | None) -> Any:
    if isinstance(v, _SCALARS):
        return v
    if type(v) is types.FunctionType:
        return _value_key(v, max(depth, 1), seen, refs, watch)
    if type(v) in (dict, list, tuple) and len(v) <= _HELPER_CONTAINER:
        # a config dict a helper reads (``CFG["head"]["scale"]``), by content; a large one (a registry) by identity
        return _value_key(v, _ATTR_DEPTH, seen, refs, watch)
    if ((hasattr(v, "__dict__") or getattr(type(v), "__slots__", None)) and not callable(v)
            and not isinstance(v, (types.ModuleType, type))
            and (not _library(type(v).__module__) or type(v).__name__ == "Namespace"
                 or type(v) is types.SimpleNamespace)):
        return _value_key(v, 4, seen, refs, watch)  # a config object (a dataclass, argparse's or a simple namespace)
    refs.append(v)
    return ("O", id(v))


_HELPER_CONTAINER = 256


def _storage_key(t: Tensor) -> Any:
    """Which memory a tensor reads: ``t.data = other`` swaps it without a version bump."""
    try:
        return t.data_ptr()
    except Exception:  # no storage (a transform's wrapper, a fake or sparse tensor)
        return None


class _Watch:
    """Everything a :func:`module_fingerprint` read that can change without changing identity, to tell cheaply
    whether the fingerprint would come out the same (:meth:`unchanged`; the full walk costs ~10 us a module).

    The fingerprint reads attribute values by identity (objects), by value (scalars: immutable, so
    identity implies value) or by content (containers, plain objects' attributes, tensors' versions,
    types). So: the same objects in every dict it read (module ``__dict__``, parameter/buffer/child
    dicts, hooks, configs' ``vars``), in every list and set, the same types of the modules and objects
    it read, the same tensor versions, and per module class the same class attributes, ``forward``,
    code and named globals. Where equal, every value the fingerprint reads is equal, so it is. A
    container type it cannot check at C speed (a Mapping other than dict, a slotted object) makes the
    watch invalid: the fingerprint is then computed in full every time, as before.
    """

    __slots__ = ("dicts", "seqs", "typed", "tensors", "classes", "functions", "reads", "contents", "valid", "_state")

    def __init__(self) -> None:
        self.dicts: list[dict[Any, Any]] = []
        self.seqs: list[Any] = []
        self.typed: list[Any] = []
        self.tensors: list[Tensor] = []
        self.classes: list[Any] = []  # (cls, forward, class values, code, globals, names, their values)
        self.functions: list[Any] = []  # (function, code, globals, names, their values): helpers a forward names
        self.reads: list[Any] = []  # (object, attribute, value): a config module's or class's attribute, a closure cell
        self.contents: list[Any] = []  # (array or tensor, digest): small ones read by content (edits through .data)
        self.valid = True
        self._state: Any = None

    def mapping(self, d: Any) -> None:
        if type(d) is dict or type(d) is OrderedDict:
            self.dicts.append(d)
        else:
            self.valid = False

    def sequence(self, v: Any) -> None:
        self.seqs.append(v)

    def seal(self) -> _Watch:
        self._state = self._now()
        return self

    def _now(self) -> Any:
        chain, dicts, seqs = itertools.chain.from_iterable, self.dicts, self.seqs
        return (tuple(map(len, dicts)), tuple(chain(dicts)), tuple(chain(map(dict.values, dicts))),
                tuple(map(len, seqs)), tuple(chain(seqs)), tuple(map(type, self.typed)),
                tuple((t._version, _storage_key(t)) for t in self.tensors))

    def unchanged(self) -> bool:
        """Every watched thing is as when :meth:`seal` was called (identities compared, never values)."""
        lens, keys, vals, seq_lens, seq_vals, types, versions = self._state
        chain, dicts, seqs, is_ = itertools.chain.from_iterable, self.dicts, self.seqs, operator.is_
        if tuple(map(len, dicts)) != lens or tuple(map(len, seqs)) != seq_lens:
            return False
        if not (all(map(is_, chain(dicts), keys)) and all(map(is_, chain(map(dict.values, dicts)), vals))
                and all(map(is_, chain(seqs), seq_vals)) and all(map(is_, map(type, self.typed), types))):
            return False
        if tuple((t._version, _storage_key(t)) for t in self.tensors) != versions:
            return False
        for cls, forward, values, code, globs, names, named in self.classes:
            if (_forward_of(cls) is not forward or getattr(forward, "__code__", None) is not code
                    or not all(map(is_, vars(cls).values(), values)) or len(vars(cls)) != len(values)
                    or not all(map(is_, map(globs.get, names), named))):
                return False
        for fn, code, globs, names, named in self.functions:
            if fn.__code__ is not code or not all(map(is_, map(globs.get, names), named)):
                return False
        for obj, name, value in self.reads:
            if _read(obj, name) is not value:
                return False
        return all(_digest(v) == d for v, d in self.contents)


class Fingerprint:
    """A hashable key (``key``) plus the objects whose identities it uses (kept alive while it is)."""

    __slots__ = ("key", "refs", "_hash")

    def __init__(self, key: Any, refs: list[Any]) -> None:
        self.key, self.refs, self._hash = key, refs, hash(key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprint) and self._hash == other._hash and self.key == other.key

    def __hash__(self) -> int:
        return self._hash


def module_fingerprint(module: nn.Module, watch: _Watch | None = None) -> Fingerprint:
    """Everything about ``module`` that can change what a trace of it records.

    Per submodule, in tree order: its identity and type, the names and identities of its
    parameters, buffers and children, and every other attribute (flags, slopes, hooks, configs,
    plain tensor attributes) through :func:`_value_key`; plus the process-wide module hooks.
    Computed on every call of a method (about 10 us per submodule here), so written for speed.
    """
    from torch.nn.modules import module as _m

    seen: dict[int, Any] = {}
    refs: list[Any] = []
    parts: list[Any] = []
    classes: dict[type, Any] = {}
    stack = [module]
    scalars = _SCALAR_TYPES
    while stack:
        m = stack.pop()
        refs.append(m)
        parts.append(id(m))
        parts.append(type(m))
        if watch is not None:
            watch.typed.append(m)
            watch.mapping(m.__dict__)
        for k, v in m.__dict__.items():
            tv = type(v)
            if tv in scalars:
                parts.append(v)
            elif k in _STRUCTURAL:
                refs.append(tuple(v.values()))
                parts.append(tuple((n, id(t)) for n, t in v.items()))
                if watch is not None:
                    watch.mapping(v)
                if k == "_modules":
                    stack.extend(c for c in reversed(v.values()) if c is not None)
            elif (tv is dict or tv is OrderedDict or tv is set) and not v:
                parts.append(0)
                if watch is not None:
                    watch.sequence(v) if tv is set else watch.mapping(v)
            elif tv is tuple and all(type(e) in scalars for e in v):
                parts.append(v)
            else:
                parts.append((k, _value_key(v, _ATTR_DEPTH, seen, refs, watch)))
        cls = type(m)
        if cls not in classes:
            classes[cls] = _class_key(cls, seen, refs, watch)
    parts.append(tuple(classes.items()))
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        table = getattr(_m, name, {})
        hooks = tuple(table.values())
        refs.append(hooks)
        parts.append(tuple(map(id, hooks)))
        if watch is not None:
            watch.mapping(table)
    return Fingerprint(tuple(parts), refs)


def _forward_of(cls: type) -> Any:
    return cls.__dict__.get("forward") or getattr(cls, "forward", None)


def _class_key(cls: type, seen: dict[int, Any], refs: list[Any], watch: _Watch | None = None) -> Any:
    """What a module class contributes besides its instances: its ``forward`` (code, defaults, closure, and
    the module-level globals it names, e.g. a ``SCALE`` constant) and its plain class attributes."""
    refs.append(cls)
    forward = _forward_of(cls)
    # the class's own plain attributes and those it inherits from the user's base classes (``Base.SCALE``)
    attrs: dict[str, Any] = {}
    for c in cls.__mro__:
        library = c is object or _library(getattr(c, "__module__", None), stdlib=False)
        if c is not cls and library:
            continue
        for k, v in vars(c).items():
            if k in attrs or k.startswith("__"):
                continue
            if type(v) in _SCALAR_TYPES or type(v) in (dict, list, tuple):
                attrs[k] = v if type(v) in _SCALAR_TYPES else _value_key(v, _ATTR_DEPTH, seen, refs, watch)
            elif not library and k != "forward":
                # the user's helper methods and properties: their code and the globals they name (a method that
                # multiplies by a module-level SCALE, one replaced on the class)
                fn = v.fget if isinstance(v, property) else getattr(v, "__func__", v)
                if type(fn) is types.FunctionType:
                    attrs[k] = _value_key(fn, _ATTR_DEPTH, seen, refs, watch)
        if c is not cls and watch is not None:
            base_forward = _forward_of(c)
            watch.classes.append((c, base_forward, tuple(vars(c).values()), getattr(base_forward, "__code__", None),
                                  {}, (), ()))
    code = getattr(forward, "__code__", None)
    globs = getattr(forward, "__globals__", None)
    if watch is not None:
        names = tuple(code.co_names) if code is not None and isinstance(globs, dict) else ()
        watch.classes.append((cls, forward, tuple(vars(cls).values()), code, globs if names else {}, names,
                              tuple(map(globs.get, names)) if names else ()))
    attrs_key = tuple(attrs.items())
    if forward is None or (getattr(forward, "__module__", None) or "").startswith("torch."):
        return (id(forward), attrs_key)
    if code is None:
        return (id(forward), attrs_key)
    refs.append(code)
    globs = globs if globs is not None else {}
    # plain containers to the attributes' depth (a config dict three levels down), other objects two levels (a
    # logger's manager holds every logger of the process)
    named = tuple((n, _value_key(globs[n], _ATTR_DEPTH if type(globs[n]) in (dict, list, tuple) else 2, seen, refs,
                                 watch)) for n in code.co_names
                  if n in globs and not _is_module_object(globs[n]) and not isinstance(globs[n], type))
    settings = _named_settings(code.co_names, globs, seen, refs, watch)
    # the closure forward reads (a class built in a factory function, reading the factory's variables)
    cells = []
    for cell in getattr(forward, "__closure__", None) or ():
        value = _read(cell, "cell_contents")
        if watch is not None:
            watch.reads.append((cell, "cell_contents", value))
        cells.append(None if value is _MISSING else _value_key(value, _ATTR_DEPTH, seen, refs, watch))
    return (id(forward), id(code), attrs_key, named, settings, tuple(cells))


_SCALAR_TYPES = frozenset((type(None), bool, int, float, str))


def shadow_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every tensor, hook and attribute value with ``module``.

    Each submodule is shallow-copied with its own parameter, buffer and child dicts, so
    ``functional_call`` on the copy swaps tensors there and never in the user's module. A module
    reached by several paths is copied once (sharing is kept).
    """
    memo: dict[int, nn.Module] = {}

    def copy_tree(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        try:
            c = copy.copy(m)
        except RuntimeError:  # parametrized modules (weight_norm, orthogonal) refuse to be copied by reduction
            c = type(m).__new__(type(m))
            c.__dict__.update(m.__dict__)
        memo[id(m)] = c
        c.__dict__["_parameters"] = dict(m._parameters)
        c.__dict__["_buffers"] = dict(m._buffers)
        c.__dict__["_modules"] = {k: None if v is None else copy_tree(v) for k, v in m._modules.items()}
        return c

    return copy_tree(module)


def _tensors_in(v: Any, depth: int, seen: set[int] | None = None) -> list[Tensor]:
    """The tensors inside a bound argument: nested containers, dataclasses and plain objects, to ``depth``."""
    if isinstance(v, Tensor):
        return [v]
    seen = set() if seen is None else seen
    if depth <= 0 or id(v) in seen or isinstance(v, (str, bytes, int, float, bool, type(None))):
        return []
    seen.add(id(v))
    if isinstance(v, Mapping):
        items: Any = v.values()
    elif isinstance(v, (tuple, list, set, frozenset)):
        items = v
    elif hasattr(v, "__dict__") and not callable(v) and not isinstance(v, nn.Module):
        items = vars(v).values()
    else:
        return []
    return [t for e in items for t in _tensors_in(e, depth - 1, seen)]


def _content_key(t: Tensor) -> Any:
    """A digest of a bound argument's values. Programs fold masks built from these arguments into constants, and
    the version counter misses edits through ``.data`` or a shared numpy buffer (``torch.from_numpy``) and edits
    of tensors nested deeper than the argument key looks: keyed on identity and version alone, such an edit was
    served the old program. None where the values are not at hand (a tensor wrapped by a transform, fake, meta)."""
    import hashlib

    from torch._C._functorch import is_functorch_wrapped_tensor
    from torch._subclasses.fake_tensor import FakeTensor

    if (is_functorch_wrapped_tensor(t) or isinstance(t, FakeTensor) or t.layout != torch.strided
            or t.device.type == "meta" or not is_concrete(t)):
        return None
    # outside any functorch level: under torch.func.grad even t.detach() of a plain tensor comes back wrapped
    with torch.no_grad(), torch._C._DisableFuncTorch():
        c = t.detach().resolve_conj().resolve_neg()
        c = (c if c.device.type == "cpu" else c.cpu()).contiguous().reshape(-1)
        digest = hashlib.sha1(c.view(torch.uint8).numpy(), usedforsecurity=False).digest() if c.numel() else b""
    return (tuple(t.shape), t.dtype, digest)


class BoundModel(FunctionalModel):
    """``model_fn`` with ``additional_forward_args`` bound after ``x`` (API §9).

    Calls ``model_fn(params, *x, *args)``. Tensor arguments whose first dim is the user's batch are
    per-sample: where a method folds ``k`` steps, samples or perturbations into the batch
    (``k * B`` rows, copies outermost, as every method folds), they are repeated ``k`` times; a call
    on the first ``n < B`` rows (the target probe) gets their first ``n`` rows. Other values pass
    unchanged. Traced programs are memoised on the wrapped model's memo, keyed on its fingerprint
    and on the arguments (tensors by identity and version), so masks are baked into a program only
    for the tensors they were traced with.
    """

    def __init__(self, model_fn: Any, args: tuple[Any, ...], batch: int, kwargs: dict[str, Any] | None = None) -> None:
        self.inner, self.args, self.batch, self.kwargs = model_fn, args, batch, dict(kwargs or {})
        self.module = getattr(model_fn, "module", None)
        inner_memo = isinstance(model_fn, FunctionalModel)
        self._lock = model_fn._lock if inner_memo else threading.RLock()
        self._programs = model_fn._programs if inner_memo else _Memo(self.memo_size)
        self._shadow = None

    def _fingerprint_now(self) -> Any:
        inner = self.inner.fingerprint() if isinstance(self.inner, FunctionalModel) else function_fingerprint(self.inner)
        refs: list[Any] = []
        args = _value_key((self.args, self.kwargs), 3, {}, refs)
        contents = tuple(_content_key(t) for t in _tensors_in((self.args, self.kwargs), 8))
        return self._interned(Fingerprint(("bound", inner, args, contents), refs))

    def shadow(self, fingerprint: Any = None) -> nn.Module:
        return self.inner.shadow()

    def per_sample(self) -> bool:
        """Some bound tensor has the batch as its first dim (it is repeated with x: programs are per batch)."""
        return bool(per_sample_tensors((self.args, self.kwargs), self.batch))

    def extra(self, n: Any) -> tuple[Any, ...]:
        """The bound positional arguments for a call on ``n`` rows."""
        return tuple(_fit_nested(a, n, self.batch) for a in self.args)

    def extra_kwargs(self, n: Any) -> dict[str, Any]:
        """The bound keyword arguments (``additional_forward_args`` given as a dict) for ``n`` rows."""
        return {k: _fit_nested(a, n, self.batch) for k, a in self.kwargs.items()}

    def __call__(self, params: Params, *x: Tensor) -> Tensor:
        n = x[0].shape[0]
        if self.kwargs:
            if not isinstance(self.inner, FunctionalModel):
                return self.inner(params, *x, *self.extra(n), **self.extra_kwargs(n))
            if torch.compiler.is_compiling():  # as FunctionalModel.__call__ compiled: no lock (dynamo cannot enter one)
                return self.inner.run(self.inner.module, params, (*x, *self.extra(n)), self.extra_kwargs(n))
            with self.inner._lock:
                return self.inner.run(self.inner.shadow(), params, (*x, *self.extra(n)), self.extra_kwargs(n))
        return self.inner(params, *x, *self.extra(n))

    def __repr__(self) -> str:
        return f"BoundModel({self.inner!r}, {len(self.args)} additional_forward_args)"


def per_sample_tensors(args: Any, batch: Any) -> list[Tensor]:
    """The tensors in ``additional_forward_args`` (nested ones too) whose first dim is the batch: repeated with x."""
    return [t for t in _tensors_in(args, 8) if t.ndim >= 1 and t.shape[0] == batch]


def _fit_nested(a: Any, n: Any, batch: int) -> Any:
    """:func:`_fit_rows` through plain tuples, lists and dicts (a list of per-layer masks, a dict of ids)."""
    if type(a) is tuple or type(a) is list:
        return type(a)(_fit_nested(e, n, batch) for e in a)
    if type(a) is dict:
        return {k: _fit_nested(e, n, batch) for k, e in a.items()}
    return _fit_rows(a, n, batch)


def _fit_rows(a: Any, n: Any, batch: int) -> Any:
    if not isinstance(a, Tensor) or a.ndim == 0 or a.shape[0] != batch or n == batch:
        return a
    if isinstance(n, int) and n < batch:
        return a[:n]
    if isinstance(n, int) and n % batch:
        raise ValueError(
            f"additional_forward_args: the method called the model on {n} rows, which are not copies of the batch of "
            f"{batch} (e.g. n_steps='auto' refines a subset of samples); per-sample arguments cannot follow them. "
            f"Use a fixed n_steps, or make the argument part of x")
    reps = n // batch
    return a.repeat(reps, *([1] * (a.ndim - 1)))


def refuse_bound_in_compiled_code(model_fn: Any, method: str) -> None:
    """Rule methods trace the model into a program once, at compile time, outside the compiled code; a model
    bound to ``additional_forward_args`` inside compiled code is not an object that step can read (and its
    tensors, inputs of the compiled function, would be baked into the program)."""
    # per-sample ones only: a shared constant (a 0-d tensor, a weight) is baked into the program as any constant is
    bound = [] if not isinstance(model_fn, BoundModel) else per_sample_tensors((model_fn.args, model_fn.kwargs),
                                                                               model_fn.batch)
    if bound and not torch.compiler.is_compiling() and not is_concrete(*bound):
        from torch._C._functorch import is_functorch_wrapped_tensor

        if any(map(is_functorch_wrapped_tensor, bound)):
            raise TypeError(
                f"{method}: additional_forward_args batched by torch.func.vmap (or another transform): {method} "
                f"traces the model into a program of its own with those tensors' values in it. They need no vmap: "
                f"pass the whole batch of them with the whole batch of x, and each sample gets its own rows")
        raise TypeError(
            f"{method}: per-sample additional_forward_args are inputs of this trace (ax.export, make_fx), but "
            f"{method} traces the model into a program of its own, with those tensors' values baked in; export "
            f"gradient methods (saliency, integrated_gradients, smoothgrad) with them, or call {method} eagerly")
    if getattr(model_fn, "bound_in_compiled_code", False):
        raise TypeError(
            f"{method}: additional_forward_args inside torch.compile is supported for gradient and perturbation "
            f"methods only; {method} traces the model once at compile time. Use ax.compile({method}, model_fn, "
            f"params, additional_forward_args=...), which binds them before compiling, or call {method} eagerly "
            f"(its traced program is reused across calls)")


def bind_forward_args(model_fn: Any, args: Any, x: Any) -> BoundModel:
    """``model_fn`` calling with ``additional_forward_args`` after ``x``; validated here."""
    kwargs: dict[str, Any] = {}
    if isinstance(args, Mapping):  # keyword arguments: {"attention_mask": mask} (HF models' positional order varies)
        if not all(isinstance(k, str) for k in args):
            raise TypeError("additional_forward_args as a dict must map argument names (str) to values")
        kwargs, args = dict(args), ()
    elif not isinstance(args, tuple):
        args = tuple(args) if isinstance(args, list) else (args,)
    first = x[0] if isinstance(x, (tuple, list)) and x else x
    if not isinstance(first, Tensor) or first.ndim < 1:
        raise TypeError("additional_forward_args needs x to be a batched Tensor or a tuple of them")
    batch = first.shape[0]  # symbolic under export's trace: per-sample arguments follow its dynamic batch
    return BoundModel(model_fn, args, batch if isinstance(batch, torch.SymInt) else int(batch), kwargs)


#: within a method call: ``{id(model): (model, fingerprint)}`` (:func:`one_fingerprint`)
_CALL_FINGERPRINTS: contextvars.ContextVar[dict[int, Any] | None] = contextvars.ContextVar(
    "attrax_call_fingerprints", default=None)


@contextlib.contextmanager
def one_fingerprint() -> Iterator[None]:
    """Within: each model's fingerprint is computed once (a method's checks, its program, shadow and plan
    lookups all read it; computing it walks the module tree). Entered by every public method (``forward_args``);
    a nested call shares the outer one's. Not under torch.compile (the methods' program lookups run once there)."""
    if _CALL_FINGERPRINTS.get() is not None:
        yield
        return
    token = _CALL_FINGERPRINTS.set({})
    try:
        yield
    finally:
        _CALL_FINGERPRINTS.reset(token)


def forward_args(method: Callable[..., Any]) -> Callable[..., Any]:
    """Give a method the ``additional_forward_args=`` keyword (API §9): extra model arguments after
    ``x``, never attributed, repeated alongside ``x`` wherever the method folds copies into the batch."""
    import functools
    import inspect

    names = list(inspect.signature(method).parameters)
    x_at, m_at = names.index("x"), names.index("model_fn")

    @functools.wraps(method)
    def wrapper(*args: Any, additional_forward_args: Any = None, **kwargs: Any) -> Any:
        if additional_forward_args is not None:
            args = list(args)
            x = args[x_at] if len(args) > x_at else kwargs.get("x")
            if len(args) > m_at:
                args[m_at] = bind_forward_args(args[m_at], additional_forward_args, x)
            else:
                kwargs["model_fn"] = bind_forward_args(kwargs["model_fn"], additional_forward_args, x)
        if torch.compiler.is_compiling():
            if additional_forward_args is not None:
                bound = args[m_at] if len(args) > m_at else kwargs["model_fn"]
                bound.bound_in_compiled_code = True  # (refuse_bound_in_compiled_code)
            return method(*args, **kwargs)
        with one_fingerprint():
            return method(*args, **kwargs)

    return wrapper


def functionalize(module: nn.Module | Callable[..., Tensor], *, output: Any = None,
                  embedding: str | None = None) -> tuple[FunctionalModel, dict[str, Tensor]]:
    r"""Turn a module into a pure function and its parameters.

    Args:
        module: The model, put in eval mode by the caller. A plain function
            ``f(params, *x)`` is accepted too and wrapped so that rule-based
            methods can reuse its traced graph between calls (``params`` is then
            empty).
        output: Which tensor of a structured result the model function returns: a key or
            attribute name of a ModelOutput / dict (``"logits"``), an int index into a tuple, or a
            callable ``out -> Tensor``. ``None``: the result itself (a tensor).
        embedding: The dotted path of an embedding layer (``"transformer.wte"``): ``model_fn`` then
            takes that layer's output (B, T, D) as x in place of the token ids, and
            ``model_fn.embed(params, ids)`` computes it, so that
            ``model_fn(params, model_fn.embed(params, ids), *rest)`` equals ``module(ids, *rest)``
            (selected by ``output``) and every method works on token models; relevance per token is
            ``attr.sum(-1)``. The module gets made-up ids (one non-pad token; the pad id where a bound
            ``attention_mask`` is 0), which is what models read past the embedding to find padding; a
            model that reads more is refused by a one-time check, and is exact with the real ids bound:
            ``additional_forward_args={"input_ids": ids, ...}``.
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
        if embedding is not None:
            if not isinstance(embedding, str):
                raise TypeError(f"embedding must be a dotted layer path (str), got {_describe(embedding)}")
            try:
                module.get_submodule(embedding)
            except AttributeError:
                names = [n for n, m in module.named_modules() if isinstance(m, nn.Embedding)]
                raise ValueError(f"embedding={embedding!r} is not a submodule of the model; embedding layers: {names}") from None
        if output is not None and not (callable(output) or isinstance(output, (str, int))) or isinstance(output, bool):
            raise TypeError(f"output must be a key/attribute name, an int index or a callable, got {_describe(output)}")
        params = dict(module.named_parameters())
        params.update(dict(module.named_buffers()))
        return FunctionalModel(module, output=output, embedding=embedding), params
    if output is not None or embedding is not None:
        raise TypeError("output= and embedding= need an nn.Module (a plain function already returns its tensor)")
    if callable(module):
        return _FunctionModel(module), {}
    raise TypeError(f"module must be a torch.nn.Module or a callable f(params, *x), got {type(module).__name__}")


class _FunctionModel(FunctionalModel):
    """Wraps a plain ``f(params, *x)`` so traced graphs can be memoised on it.

    Its fingerprint covers what the function can read besides its arguments: its code, defaults,
    closure cells and the globals it names (modules among them by their own fingerprint).
    """

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.module = None  # type: ignore[assignment]
        self._lock = threading.RLock()
        self._programs = _Memo(self.memo_size)
        self._shadow = None

    def _fingerprint_now(self) -> Any:
        return self._interned(function_fingerprint(self.fn))

    def __call__(self, params: Params, *x: Tensor) -> Tensor:
        return self.run(None, params, x)

    def run(self, module: Any, params: Params, x: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Tensor:
        """The function itself (``module`` is None): every call goes here, as a module's calls go to its ``run``
        (``ax.lm.generation``'s shared forward, keyword ``additional_forward_args``)."""
        return self.fn(params, *x, **(kwargs or {}))

    def shadow(self, fingerprint: Any = None) -> Any:
        return None

    def __repr__(self) -> str:
        return f"FunctionalModel({getattr(self.fn, '__name__', 'fn')})"


def function_fingerprint(fn: Any) -> Any:
    """What a plain function reads besides its arguments: code, defaults, closure and named globals."""
    seen: dict[int, Any] = {}

    refs: list[Any] = [fn]

    def key(v: Any) -> Any:
        if isinstance(v, FunctionalModel):
            return v.fingerprint()
        return module_fingerprint(v) if isinstance(v, nn.Module) else _value_key(v, _ATTR_DEPTH, seen, refs)

    target = getattr(fn, "__func__", fn)
    code = getattr(target, "__code__", None)
    if code is None:  # a callable object: its attributes
        attrs = tuple((k, key(v)) for k, v in vars(fn).items()) if hasattr(fn, "__dict__") else ()
        return Fingerprint((id(fn), attrs), refs)
    cells = tuple(key(c.cell_contents) if _cell_full(c) else None for c in (target.__closure__ or ()))
    globs = getattr(target, "__globals__", {})
    named = tuple((n, key(globs[n])) for n in code.co_names if n in globs and not _is_module_object(globs[n]))
    settings = _named_settings(code.co_names, globs, seen, refs, None)
    bound = key(fn.__self__) if hasattr(fn, "__self__") else None
    return Fingerprint((id(code), key(target.__defaults__), key(target.__kwdefaults__), cells, named, settings, bound),
                       refs)


def _cell_full(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _is_module_object(v: Any) -> bool:
    return isinstance(v, types.ModuleType)


#: set while a wrapper (noise_tunnel, metrics) calls an inner method: the wrapper has warned already
_TRAINING_WARNED: contextvars.ContextVar[bool] = contextvars.ContextVar("attrax_training_warned", default=False)


@contextlib.contextmanager
def training_warned() -> Iterator[None]:
    """Within: inner method calls do not repeat the training-mode warning of the call around them (no warning
    under torch.compile, whose code cannot set a context variable)."""
    if torch.compiler.is_compiling():
        yield
        return
    token = _TRAINING_WARNED.set(True)
    try:
        yield
    finally:
        _TRAINING_WARNED.reset(token)


def warn_training(model_fn: Any) -> None:
    """One ``UserWarning`` naming the layers of ``model_fn``'s module that are in training mode and make
    attributions random or batch-dependent (dropout, BatchNorm); silent in ``value_and_attribution``."""
    module = getattr(model_fn, "module", None)
    if not isinstance(module, nn.Module) or not module.training and not (
            model_fn.derived("any_training", lambda: any(m.training for m in module.modules()))
            if isinstance(model_fn, FunctionalModel) and not torch.compiler.is_compiling()
            else any(m.training for m in module.modules())):
        return
    if keeps_graph() or torch.compiler.is_compiling() or _TRAINING_WARNED.get():
        return
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.modules.instancenorm._InstanceNorm)
    layers = [f"'{path}' ({type(m).__name__})" for path, m in module.named_modules() if m.training and isinstance(m, kinds)]
    if layers:
        shown = ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
        warnings.warn(
            f"the model is in training mode in {shown}: dropout makes attributions random and BatchNorm uses "
            f"batch statistics (its running statistics are not updated); call module.eval() first for "
            f"deterministic attributions",
            UserWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- checks


def is_concrete(*tensors: Any) -> bool:
    """True when tensor values can be inspected in Python (no transform, no tracing)."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    # make_fx / export tracing: even real tensors (captured constants) only give symbolic results
    if any(isinstance(m, (ProxyTorchDispatchMode, FakeTensorMode)) for m in _get_current_dispatch_mode_stack()):
        return False
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
    return map_tensors(params, Tensor.detach), tuple(t.detach() for t in xs)


def map_tensors(params: Params, fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """``{k: fn(v)}``, applying ``fn`` once per distinct tensor so tied entries stay one tensor.

    (``functional_call`` rejects two different tensors for the names of one tied parameter.)
    """
    done: dict[int, Tensor] = {}
    out = {}
    for k, v in params.items():
        if id(v) not in done:
            done[id(v)] = fn(v)
        out[k] = done[id(v)]
    return out


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
    check_param_names(model_fn, params)


def check_param_names(model_fn: Any, params: Mapping[str, Tensor]) -> None:
    """Every key of ``params`` must name a parameter or buffer of a functionalized module.

    ``functional_call`` would silently ignore an unknown key (a typo such as
    ``"0.weigth"``), so the model would run with its own tensor instead of the one
    passed. Keys may be missing (the module's own tensors are used, e.g. buffers while
    differentiating w.r.t. parameters only). Plain functions have no names to check.
    """
    module = model_fn.module if isinstance(model_fn, FunctionalModel) else None
    if not isinstance(module, nn.Module) or torch.compiler.is_compiling():
        return

    def names() -> frozenset[str]:  # every slot a module has for a parameter or buffer, by every path to it
        return frozenset(f"{prefix}.{name}" if prefix else name
                         for prefix, owner in module.named_modules(remove_duplicate=False)
                         for name in (*owner._parameters, *owner._buffers))

    known_names = model_fn.derived("param_names", names)
    unknown = [k for k in params if k not in known_names]
    if unknown:
        import difflib

        known = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        known.update(n for n, _ in module.named_buffers(remove_duplicate=False))
        hints = []
        for k in unknown[:3]:
            close = difflib.get_close_matches(k, known, n=1)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ValueError(
            f"params has key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}{more} that name{'' if len(unknown) > 1 else 's'} no parameter or "
            f"buffer of the {type(module).__name__} module; params keys must be names from "
            f"module.named_parameters() / named_buffers() (as returned by ax.functionalize)"
        )


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
        if check_finite:
            check_finite_tensor(t, label)
    assert batch is not None
    return batch


def check_finite_tensor(t: Tensor, label: str) -> None:
    """``t`` must hold no NaN or inf (skipped when its values are symbolic)."""
    # one reduction is finite iff every element is (or the sum overflowed: then check exactly)
    if is_concrete(t) and t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{label} must be finite; it contains NaN or inf (pass check_finite=False to allow)")


def check_dtypes(params: Mapping[str, Tensor], xs: tuple[Tensor, ...]) -> str | None:
    """Describe a floating dtype mismatch between ``x`` and ``params`` (``None`` when they agree).

    A mismatch is not an error by itself (a model may cast); callers evaluate the model
    to find out, and report this description when it fails.
    """
    x_dtypes = {t.dtype for t in xs}
    odd = {k: v.dtype for k, v in params.items() if v.is_floating_point() and v.dtype not in x_dtypes}
    if not odd:
        return None
    name, dtype = next(iter(odd.items()))
    got = " and ".join(sorted(str(d) for d in x_dtypes))
    return (
        f"x has dtype {got} but params hold dtype {dtype} (e.g. {name!r}); convert one to match the other, "
        f"e.g. x.to({dtype}) or {{k: v.to({next(iter(x_dtypes))}) for k, v in params.items()}}"
    )


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


def broadcast_baseline(baseline: Any, x: Tensor, name: str = "baseline", check_finite: bool = True) -> Tensor:
    """A reference input with the shape, dtype and device of ``x``.

    ``None`` means zeros; a number fills; a tensor must broadcast to ``x``. With
    ``check_finite`` NaN/inf are rejected, as in ``x``.
    """
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        if check_finite and not _isfinite(baseline):
            raise ValueError(f"{name} must be finite, got {baseline} (pass check_finite=False to allow)")
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
    if check_finite:
        check_finite_tensor(baseline, name)
    return baseline.to(dtype=x.dtype, device=x.device).expand_as(x)


def baselines_for(
    baseline: Any, xs: tuple[Tensor, ...], name: str = "baseline", check_finite: bool = True
) -> tuple[Tensor, ...]:
    """Per-input baselines for a tuple of inputs (finite unless ``check_finite=False``)."""
    if isinstance(baseline, (tuple, list)):
        if len(baseline) != len(xs):
            raise ValueError(f"{name} has {len(baseline)} entries but x has {len(xs)} inputs")
        return tuple(
            broadcast_baseline(b, t, f"{name}[{i}]", check_finite) for i, (b, t) in enumerate(zip(baseline, xs))
        )
    return tuple(broadcast_baseline(baseline, t, name, check_finite) for t in xs)


def chunks(n: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(n)`` with at most ``chunk_size`` each."""
    step = n if chunk_size is None else chunk_size
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (int, float, str)) else type(value).__name__


def _isfinite(value: numbers.Real) -> bool:
    import math

    return math.isfinite(value)


def without_inference_tensors(params: Params, xs: tuple[Tensor, ...]) -> tuple[Params, tuple[Tensor, ...]]:
    """Replace inference tensors (made under ``torch.inference_mode``) by normal clones.

    Inference tensors can never be recorded by autograd ("cannot be saved for
    backward"), so gradient methods could not use them even in a local
    ``torch.inference_mode(False)`` block. Only inference tensors are copied;
    everything else passes through unchanged (and keeps sharing storage).
    """
    if torch.compiler.is_compiling():
        return params, xs
    if not any(t.is_inference() for t in xs) and not any(v.is_inference() for v in params.values()):
        return params, xs
    with torch.inference_mode(False):
        xs = tuple(t.clone() if t.is_inference() else t for t in xs)
        params = map_tensors(params, lambda v: v.clone() if v.is_inference() else v)
    return params, xs
