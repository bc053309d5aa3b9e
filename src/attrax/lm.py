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

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params

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


def _at(out: Tensor, position: Any) -> Tensor:
    """``out[i, position_i]`` for every sample: the (B, V) logits at one position per sample."""
    if out.ndim != 3:
        raise ValueError(f"LM targets need logits of shape (B, T, V), got {tuple(out.shape)}; "
                         f"functionalize(lm, output='logits')")
    pos = _per_sample(position, out, "position") % out.shape[1]
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

    def target(out: Tensor) -> Tensor:
        row = _at(out, position)
        return _pick(torch.log_softmax(row, -1) if log_prob else row, token)

    return target


def contrast(token: Any, foil: Any, position: Any = -1) -> Callable[[Tensor], Tensor]:
    """The logit difference ``token - foil`` at ``position`` (why this token rather than that one)."""

    def target(out: Tensor) -> Tensor:
        row = _at(out, position)
        return _pick(row, token) - _pick(row, foil)

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
            total = total + _pick(_at(logp, s + k - 1), toks[:, k])
        return total

    return target


def generation(
    attribute: Callable[..., Tensor],
    model_fn: ModelFn,
    params: Params,
    x: Tensor,
    continuation_ids: Tensor,
    *,
    start: int,
    log_prob: bool = False,
    chunk_size: int | None = None,
    **method_kwargs: Any,
) -> Tensor:
    r"""Attribution of every continuation token to every token of the sequence, ``(B, n_new, T)``.

    ``x`` is the embedding of the whole sequence (prompt and continuation, ``(B, T, D)``), and
    ``continuation_ids`` the ``(B, n_new)`` (or ``(n_new,)``) ids of the tokens at positions
    ``start, start + 1, ...``. Row ``k`` is ``attribute(model_fn, params, x, next_token(tok_k,
    start + k - 1)).sum(-1)``: the relevance of each position for predicting token ``k``, computed for
    all rows at once with ``torch.func.vmap`` (``chunk_size`` rows at a time), so the forward at ``x``
    is shared. Positions at or after ``start + k`` get zero in a causal model.

    Args:
        attribute: Any attrax method (``ax.integrated_gradients``, ``ax.lrp`` with
            ``composite=ax.composites.attn_lrp()``, ``ax.deeplift``, ...).
        start: Position of the first continuation token (> 0).
        log_prob: Explain log-probabilities instead of logits.
        method_kwargs: Passed to ``attribute`` (``additional_forward_args``, ``composite``, ...).
    Returns:
        A ``(B, n_new, T)`` tensor.
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(f"x must be the sequence's embedding of shape (B, T, D), got {getattr(x, 'shape', x)}")
    if not isinstance(start, int) or not 0 < start < x.shape[1] + 1:
        raise ValueError(f"start must be an int position in (0, {x.shape[1]}], got {start!r}")
    ids = torch.as_tensor(continuation_ids, device=x.device)
    ids = ids.expand(x.shape[0], -1) if ids.ndim == 1 else ids
    n = ids.shape[1]
    if start + n - 1 > x.shape[1]:
        raise ValueError(f"a continuation of {n} tokens from position {start} does not fit a sequence of {x.shape[1]}")
    positions = torch.arange(start - 1, start - 1 + n, device=x.device)

    def row(pos: Tensor, tok: Tensor) -> Tensor:
        return attribute(model_fn, params, x, next_token(tok, pos, log_prob=log_prob), **method_kwargs).sum(-1)

    with warnings.catch_warnings():
        # torch has no batching rule for the fused attention backward yet: its fallback is exact, only slower
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        rows = torch.func.vmap(row, in_dims=(0, 1), chunk_size=chunk_size)(positions, ids)  # (n, B, T)
    return rows.transpose(0, 1)
