"""Token and span perturbation for language models (Captum's ``LLMAttribution``).

Captum's ``LLMAttribution(FeatureAblation | ShapleyValueSampling | ShapleyValues, tokenizer)``
scores a prompt by the log-probability of a fixed target continuation,
:math:`\\sum_k \\log p(t_k \\mid \\text{prompt}, t_{<k})`, and perturbs interpretable features of
the prompt: its tokens (``TextTokenInput``, ``skip_tokens`` left fixed, one baseline token) or
the segments of a template (``TextTemplateInput``, each segment replaced by its baseline text).

The attrax form is a pure function of the *editable* prompt token ids::

    fn, x, target, feature_mask, baseline = ax.text.span_problem(
        model_fn, prompt_ids, continuation_ids, spans=[(0, 2), (3, 5)], baseline=[[7, 8], 9])
    a = ax.feature_ablation(fn, params, x, target, feature_mask=feature_mask, baseline=baseline)

``x`` holds the prompt tokens that belong to a span (the others, like Captum's skipped tokens
and fixed template text, live inside ``fn``), ``fn(params, x, *rest)`` rebuilds
``prompt + continuation`` and calls ``model_fn`` on it, ``target`` is
``ax.targets.continuation(continuation_ids, len(prompt))``, one feature group per span, and
``baseline`` gives each editable position its baseline token id. Every perturbation method runs
on it (``shapley_sampling``, ``shapley_values``, ``kernel_shap``, ``lime`` ...), and
:func:`span_attribution` does it in one call and returns one value per span.

Captum replaces a template segment by a baseline *string*, which may tokenize to a different
number of tokens; a fixed-length id tensor cannot express that, so here a span's baseline has
the span's length (one id, repeated, or one id per token). With such baselines, the results
equal Captum's (``forward_in_tokens=False`` exactly; the default token-by-token decoding up to
float rounding), and ``shapley_sampling(generator=torch.Generator().manual_seed(s))`` draws the
permutations that ``ShapleyValueSampling`` draws after ``torch.manual_seed(s)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .core import FunctionalModel, bind_forward_args
from .lm import _param_signature
from .lm import continuation as _continuation

__all__ = ["span_problem", "span_attribution", "token_spans"]

Span = tuple[int, int]

#: span_attribution's default chunk_size: perturbed sequences per model call, about this many tokens
_TOKENS_PER_CALL = 1536


def token_spans(n: int, skip: Sequence[int] = ()) -> list[Span]:
    """One span per token position ``0..n-1``, leaving out the positions in ``skip`` (fixed)."""
    skipped = set(int(i) for i in skip)
    return [(i, i + 1) for i in range(n) if i not in skipped]


def _check_ids(t: Any, name: str) -> Tensor:
    if not isinstance(t, Tensor) or t.is_floating_point() or t.dtype == torch.bool or t.ndim not in (1, 2):
        raise TypeError(f"{name} must be an integer tensor of shape (n,) or (1, n)")
    if t.ndim == 2:
        if t.shape[0] != 1:
            raise ValueError(f"{name} must hold one sequence, got shape {tuple(t.shape)}")
        t = t[0]
    return t


def span_problem(
    model_fn: Callable[..., Tensor],
    prompt_ids: Tensor,
    continuation_ids: Tensor,
    *,
    spans: Sequence[Span] | None = None,
    baseline: int | Sequence[int | Sequence[int]] = 0,
) -> tuple[Callable[..., Tensor], Tensor, Callable[[Tensor], Tensor], Tensor, Tensor]:
    """Span perturbation of a prompt scored by the log-probability of a continuation.

    Args:
        model_fn: ``model_fn(params, ids, *rest) -> logits (B, T, V)`` over token ids (e.g.
            ``ax.functionalize(lm, output="logits")``).
        prompt_ids: ``(n,)`` or ``(1, n)`` prompt token ids.
        continuation_ids: ``(m,)`` or ``(1, m)`` ids of the scored continuation (never perturbed).
        spans: Disjoint half-open token ranges ``(start, end)`` of the prompt, one feature each;
            positions in no span stay fixed. ``None``: every prompt token alone.
        baseline: The token id that replaces every perturbed token, or one entry per span: an
            id (repeated over the span) or a sequence of ``end - start`` ids.

    Returns:
        ``(fn, x, target, feature_mask, baseline)``: ``fn(params, x, *rest)`` calls ``model_fn``
        on ``prompt + continuation`` (``rest``, or keyword arguments from a dict
        ``additional_forward_args``, e.g. an attention mask over all ``n + m`` positions) with the
        span tokens taken from ``x`` ``(1, n_editable)``;
        ``target`` is the continuation's log-probability; ``feature_mask`` ``(1, n_editable)``
        holds the span index of each position of ``x``; ``baseline`` ``(1, n_editable)`` its
        baseline id.
    """
    return _span_problem(model_fn, prompt_ids, continuation_ids, spans, baseline, trim=False)


def _span_problem(model_fn: Callable[..., Tensor], prompt_ids: Tensor, continuation_ids: Tensor,
                  spans: Sequence[Span] | None, baseline: int | Sequence[int | Sequence[int]], trim: bool,
                  ) -> tuple[Callable[..., Tensor], Tensor, Callable[[Tensor], Tensor], Tensor, Tensor]:
    """:func:`span_problem`; with ``trim`` and a model whose forward takes ``logits_to_keep`` (HF causal
    LMs), ``fn`` asks for the logits of the last ``m + 1`` positions only (the target reads ``m`` of
    them: the LM head and its ``(B, T, V)`` output on the other positions are never computed)."""
    prompt = _check_ids(prompt_ids, "prompt_ids")
    cont = _check_ids(continuation_ids, "continuation_ids")
    n = prompt.shape[0]
    if cont.shape[0] == 0:
        raise ValueError("continuation_ids is empty")
    spans = token_spans(n) if spans is None else [(int(s), int(e)) for s, e in spans]
    if not spans:
        raise ValueError("spans is empty")
    owner = torch.full((n,), -1, dtype=torch.long)
    for k, (s, e) in enumerate(spans):
        if not 0 <= s < e <= n:
            raise ValueError(f"span {k} = ({s}, {e}) is not a non-empty range inside the prompt of {n} tokens")
        if (owner[s:e] >= 0).any():
            raise ValueError(f"span {k} = ({s}, {e}) overlaps another span")
        owner[s:e] = k
    if isinstance(baseline, (Tensor, int)) and not isinstance(baseline, bool):
        if isinstance(baseline, Tensor) and baseline.numel() != 1:
            raise ValueError("a tensor baseline must hold one token id; give per-span baselines as a list")
        per_pos = torch.full((n,), int(baseline), dtype=prompt.dtype)
    else:
        if len(baseline) != len(spans):
            raise ValueError(f"baseline has {len(baseline)} entries but there are {len(spans)} spans")
        per_pos = prompt.clone()
        for k, ((s, e), b) in enumerate(zip(spans, baseline)):
            ids = torch.as_tensor(b, dtype=prompt.dtype).reshape(-1)
            if ids.numel() == 1:
                ids = ids.expand(e - s)
            if ids.numel() != e - s:
                raise ValueError(f"baseline {k} has {ids.numel()} tokens but span ({s}, {e}) has {e - s}; "
                                 "a span's baseline must keep its length")
            per_pos[s:e] = ids
    editable = (owner >= 0).nonzero().flatten()
    x = prompt[editable].unsqueeze(0).to(prompt.device)
    mask = owner[editable].unsqueeze(0).to(prompt.device)
    base = per_pos[editable].unsqueeze(0).to(prompt.device)

    keep = _logits_to_keep(model_fn, cont.shape[0] + 1) if trim else None
    shared = _SharedPrefix(model_fn, torch.cat([prompt, cont]), n, keep) if keep is not None else None

    def fn(params: Any, ids: Tensor, *rest: Any, **kw: Any) -> Tensor:
        b = ids.shape[0]
        full = prompt.to(ids.device).unsqueeze(0).expand(b, n).clone()
        full[:, editable.to(ids.device)] = ids
        seq = torch.cat([full, cont.to(ids.device).unsqueeze(0).expand(b, -1)], 1)
        if shared is not None and not rest and not kw:
            out = shared(params, seq)
            if out is not None:
                return out
        if keep is not None:
            kw = {**kw, **keep}
        if kw:  # additional_forward_args given as a dict: keyword arguments, routed as attrax routes them
            return bind_forward_args(model_fn, kw, seq)(params, seq, *rest)
        return model_fn(params, seq, *rest)

    if hasattr(model_fn, "module"):
        fn.module = model_fn.module  # type: ignore[attr-defined]  (training-mode warning)
    return fn, x, _continuation_log_prob(cont, n, from_end=keep is not None), mask, base


class _SharedPrefix:
    """Perturbed copies of one sequence that agree on their first ``p`` tokens, run from the key/value cache of
    the unperturbed sequence's first ``p`` positions (HF ``past_key_values``): each row computes positions
    ``p..T-1`` only. A causal model's logits there do not depend on how the prefix's keys and values were
    batched, so this changes the numbers by float rounding only; the first call checks it on one perturbed row
    against the full forward (a model whose early positions see later tokens fails it) and otherwise turns it
    off. Used only without gradients, on an eval-mode transformers causal LM (``GenerationMixin``, not
    encoder-decoder) without sliding-window layers (their cache keeps only the last window of keys); any other
    module that names ``past_key_values`` takes the full forward (a slightly non-causal model could pass a numeric
    check: found in review). The prefix cache is recomputed when a parameter tensor changes (identity, storage
    or in-place version)."""

    def __init__(self, model_fn: Any, ref: Tensor, n: int, keep: dict[str, int]) -> None:
        self.model_fn, self.ref, self.n, self.keep = model_fn, ref, n, keep
        module = model_fn.module
        self.on = _causal_lm(module) and "past_key_values" in inspect.signature(module.forward).parameters \
            and not module.training
        self.checked = False
        self.cache: tuple[Any, Any] | None = None  # (params it was computed with, ((k, v) per layer))

    def _run(self, params: Any, ids: Tensor, kwargs: dict[str, Any], select: bool) -> Any:
        f = self.model_fn
        with f._lock:
            shadow = f.shadow()
            if select:
                return f.run(shadow, params, (ids,), kwargs)
            return torch.func.functional_call(shadow, dict(params), (ids,), kwargs, strict=False)

    def _prefix(self, params: Any, ref: Tensor) -> Any:
        if self.cache is None or self.cache[0] != _param_signature(params):
            out = self._run(params, ref.unsqueeze(0), {"use_cache": True, "logits_to_keep": 1}, select=False)
            past = getattr(out, "past_key_values", None)
            legacy = past.to_legacy_cache() if hasattr(past, "to_legacy_cache") else past
            if not isinstance(legacy, (tuple, list)) or not all(
                    isinstance(kv, (tuple, list)) and len(kv) == 2 and all(isinstance(t, Tensor) for t in kv)
                    for kv in legacy):
                return None
            self.cache = (_param_signature(params), tuple((k, v) for k, v in legacy))
        return self.cache[1]

    def __call__(self, params: Any, seq: Tensor) -> Tensor | None:
        if not self.on or torch.is_grad_enabled():
            return None
        try:
            from transformers.cache_utils import DynamicCache
        except ImportError:
            self.on = False
            return None
        ref = self.ref.to(seq.device)
        differs = (seq != ref).any(0).nonzero()
        p = min(int(differs[0, 0]) if differs.numel() else self.n, self.n - 1)
        if p < 1:
            return None
        try:
            legacy = self._prefix(params, ref)
        except Exception:
            legacy = None
        if legacy is None:
            self.on = False
            return None
        b = seq.shape[0]
        if any(k.shape[2] != ref.shape[0] or v.shape[2] != ref.shape[0] for k, v in legacy):
            self.on = False  # a cache that does not hold every position (a window): the full forward
            return None
        cache = DynamicCache.from_legacy_cache(tuple(
            (k[:, :, :p].expand(b, *k.shape[1:2], p, *k.shape[3:]), v[:, :, :p].expand(b, *v.shape[1:2], p, *v.shape[3:]))
            for k, v in legacy))
        try:
            out = self._run(params, seq[:, p:], {"past_key_values": cache, "use_cache": True, **self.keep}, select=True)
        except Exception:  # a forward that names past_key_values but takes no DynamicCache: the full forward
            self.on = False
            return None
        rows = (seq != ref).any(1).nonzero()
        if not self.checked and rows.numel():
            row = int(rows[0, 0])  # a perturbed row: its suffix differs from the cached prefix's sequence
            whole = self._run(params, seq[row:row + 1], dict(self.keep), select=True)
            ok = isinstance(out, Tensor) and isinstance(whole, Tensor) and out.shape[1:] == whole.shape[1:] and bool(
                torch.allclose(out[row:row + 1], whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max())))
            self.checked = True
            if not ok:
                self.on = False
                return None
        return out


def _causal_lm(module: Any) -> bool:
    """A transformers causal LM (generation mixin, not encoder-decoder) without sliding-window attention."""
    try:
        from transformers import GenerationMixin
    except ImportError:
        return False
    cfg = getattr(module, "config", None)
    if not isinstance(module, GenerationMixin) or cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None):
        return False
    return not any("sliding" in str(t) or "chunk" in str(t) for t in (getattr(cfg, "layer_types", None) or ()))


def _logits_to_keep(model_fn: Any, k: int) -> dict[str, int] | None:
    """``{"logits_to_keep": k}`` where ``model_fn`` is ``functionalize(module, output=...)`` of a module whose
    forward names ``logits_to_keep`` (HF causal LMs: the logits of the last ``k`` positions), else None."""
    module = getattr(model_fn, "module", None)
    if not isinstance(model_fn, FunctionalModel) or type(model_fn) is not FunctionalModel or module is None \
            or getattr(model_fn, "embedding", None) is not None:
        return None
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return {"logits_to_keep": k} if "logits_to_keep" in params else None


def _continuation_log_prob(cont: Tensor, start: int, from_end: bool = False) -> Callable[[Tensor], Tensor]:
    """``ax.lm.continuation(cont, start)`` for one prompt: the log-softmax of the continuation's
    ``m`` positions only (the general target normalises all ``T`` positions: ``T / m`` times the work
    on ``(K * B, T, V)`` logits, one row per perturbation). ``from_end``: ``out`` holds the logits of the
    last ``L >= m + 1`` positions of ``prompt + continuation`` (``logits_to_keep``), read from its end."""
    m = cont.shape[0]

    def target(out: Tensor) -> Tensor:
        if out.ndim != 3 or (from_end and out.shape[1] < m + 1):
            return _continuation(cont, start)(out)  # its error message
        lo = out.shape[1] - m - 1 if from_end else start - 1
        rows = out[:, lo:lo + m]  # (B, m, V): the predictions of the continuation's tokens
        toks = cont.to(out.device).view(1, m, 1).expand(out.shape[0], m, 1)
        logp = torch.log_softmax(rows, -1).gather(2, toks).squeeze(2)
        total = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
        for k in range(m):  # summed in lm.continuation's order
            total = total + logp[:, k]
        return total

    return target


def span_attribution(
    method: Callable[..., Tensor],
    model_fn: Callable[..., Tensor],
    params: Any,
    prompt_ids: Tensor,
    continuation_ids: Tensor,
    *,
    spans: Sequence[Span] | None = None,
    baseline: int | Sequence[int | Sequence[int]] = 0,
    **kwargs: Any,
) -> Tensor:
    """``method`` (``ax.feature_ablation``, ``ax.shapley_sampling``, ...) over the spans of a prompt.

    Arguments as in :func:`span_problem`; ``kwargs`` go to ``method`` (``generator=``,
    ``n_samples=``, ``additional_forward_args=`` ...; ``chunk_size`` defaults to about 1.5k tokens a call).
    Returns ``(n_spans,)``: the attribution of
    each span to the continuation's log-probability, Captum's ``LLMAttribution(...).seq_attr``.
    """
    fn, x, target, mask, base = _span_problem(model_fn, prompt_ids, continuation_ids, spans, baseline, trim=True)
    if "chunk_size" not in kwargs and "chunk_size" in inspect.signature(method).parameters:
        # all perturbations in one call spill the caches: about 1.5k tokens a call ran 1.8x faster than 97 x 100
        # tokens in one call (GPT-2, hidden 128, CPU); the results do not depend on it
        seq = _check_ids(prompt_ids, "prompt_ids").shape[0] + _check_ids(continuation_ids, "continuation_ids").shape[0]
        kwargs["chunk_size"] = max(1, _TOKENS_PER_CALL // seq)
    attr = method(fn, params, x, target, feature_mask=mask, baseline=base, **kwargs)
    k = int(mask.max()) + 1
    first = torch.stack([(mask[0] == g).nonzero()[0, 0] for g in range(k)])
    return attr[0, first]
