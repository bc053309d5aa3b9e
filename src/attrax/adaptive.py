r"""Adaptive Integrated Gradients: per-sample quadrature refined until completeness holds.

``ax.integrated_gradients(..., n_steps="auto")`` and ``ax.gradients.adaptive_integrated_gradients``
(re-exported from :mod:`attrax.gradients`) run :func:`adaptive_integrated_gradients`; the
adaptive composite Gauss-Legendre rule (``strategy="panels"``) is :class:`_Panels`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ._grad import _pack, call_baseline, grad_of_selected, path_gradient_sum, quadrature
from ._types import ModelFn, Params, Target, TensorOrTuple
from .core import baselines_for, check_nonnegative, check_positive_int, inside_transform
from .targets import PerSampleIndex, ResolvedTarget, prepare_call, select

__all__ = ["AdaptiveIG", "STRATEGIES", "adaptive_integrated_gradients"]


@dataclass(frozen=True)
class AdaptiveIG:
    r"""Result of :func:`adaptive_integrated_gradients`.

    ``attributions`` as ``x``. Per sample, shape ``(B,)``: ``steps`` the gradient nodes of the
    rule it ended with; ``evaluations`` the gradient evaluations spent on it in all (discarded
    rules included) and ``forwards`` the extra forward-only evaluations (panel ends); ``gap`` its
    relative completeness gap :math:`|\sum a - \Delta f| / |\Delta f|`; ``converged`` whether that
    is under ``rtol`` (or, for :math:`\Delta f \approx 0`, the gap is at rounding level).
    """

    attributions: TensorOrTuple
    steps: Tensor
    gap: Tensor
    converged: Tensor
    evaluations: Tensor
    forwards: Tensor


STRATEGIES = ("panels", "doubling")


def adaptive_integrated_gradients(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    baseline: Tensor | float | tuple[Any, ...] | None = None,
    rtol: float = 0.01,
    max_steps: int = 512,
    start_steps: int = 16,
    strategy: str = "panels",
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> AdaptiveIG:
    r"""Integrated Gradients with per-sample quadrature refined until completeness holds to ``rtol``.

    Completeness gives an exact error oracle: the relative gap
    :math:`|\sum_i a_i - (f_t(x) - f_t(x'))| / |f_t(x) - f_t(x')|` of any quadrature is known
    without a reference. Every sample starts with ``start_steps``-point Gauss-Legendre; the samples
    still above ``rtol`` are refined, all of them together in each round (one batched gradient call
    per round), until they meet it or run out of ``max_steps``:

    * ``strategy="doubling"``: recompute with twice the Gauss-Legendre steps. ``max_steps`` bounds
      the last rule; the evaluations add up to about twice that.
    * ``strategy="panels"`` (default): adaptive composite Gauss-Legendre. The rejected rule is
      replaced by ``start_steps`` equal panels with one node each, and then only the panels that
      hold the largest errors are halved. Each panel's own error is known exactly, because
      completeness holds on every piece of the path too (:math:`\int_a^b \partial_\alpha
      f(\gamma(\alpha))\,d\alpha = f(\gamma(b)) - f(\gamma(a))`, one forward per cut). On ReLU
      networks the integrand is piecewise constant and the error sits in the few panels that hold
      a kink, so refining just those converges far faster than refining everywhere. ``max_steps``
      bounds all gradient evaluations spent on a sample (the forwards are counted separately).
      Measured in benchmarks/bench_dataset.py and notes/decisions.md.

    Samples whose output does not change along the path (:math:`\Delta f \approx 0`) count as
    converged when the gap is at rounding level. Eager only (the loop depends on the data).
    ``baseline`` may be a callable, as for :func:`integrated_gradients`.

    Returns:
        :class:`AdaptiveIG` with the attributions, steps and evaluations used, gaps and flags.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double().eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> r = ax.gradients.adaptive_integrated_gradients(model_fn, params, torch.randn(4, 3, dtype=torch.float64), None, rtol=1e-6)
        >>> bool(r.converged.all()), r.steps.tolist()
        (True, [16, 16, 16, 16])
    """
    if inside_transform() or torch.compiler.is_compiling():
        raise ValueError(
            'n_steps="auto" picks steps from the data (a data-dependent loop), so it cannot run inside '
            "torch.func transforms or torch.compile; use a fixed n_steps there"
        )
    xs, params, is_tuple, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite)
    check_positive_int(max_steps, "max_steps")
    check_positive_int(start_steps, "start_steps")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    tol = check_nonnegative(rtol, "rtol")
    bs = baselines_for(call_baseline(baseline, xs, is_tuple), xs, check_finite=check_finite)
    with torch.no_grad():
        f_x, f_b = select(model_fn(params, *xs), t), select(model_fn(params, *bs), t)
    span = f_x - f_b
    scale = span.abs()
    limit = torch.maximum(tol * scale, torch.finfo(span.dtype).eps ** 0.5 * (1 + scale))  # absolute gap accepted
    device = xs[0].device
    attrs = [torch.zeros_like(xi) for xi in xs]
    steps = torch.zeros(batch, dtype=torch.long, device=device)
    evaluations = torch.zeros_like(steps)
    gap = torch.zeros_like(span)
    todo = torch.arange(batch, device=device)
    n = min(start_steps, max_steps)
    while todo.numel():
        sub, sub_b = tuple(xi[todo] for xi in xs), tuple(b[todo] for b in bs)
        alphas, weights = quadrature("gausslegendre", n)
        sums = path_gradient_sum(model_fn, params, sub, sub_b, _subset_target(t, todo), alphas, weights, chunk_size)
        part = tuple(s * (xi - b) for s, xi, b in zip(sums, sub, sub_b))
        g = sum(p.reshape(len(todo), -1).sum(1) for p in part) - span[todo]
        for a, p in zip(attrs, part):
            a[todo] = p.to(a.dtype)
        steps[todo], gap[todo] = n, g
        evaluations[todo] += n
        ok = g.abs() <= limit[todo]
        if strategy == "panels" or n >= max_steps:
            break
        todo = todo[~ok]
        n = min(2 * n, max_steps)
    forwards = torch.zeros_like(steps)
    if strategy == "panels":
        todo = todo[~ok]
        if todo.numel() and max_steps - n >= 2:
            root = tuple(s[~ok] for s in sums)
            _Panels(model_fn, params, xs, bs, t, todo, f_b[todo], f_x[todo], gap[todo], root, n, limit[todo],
                    max_steps, chunk_size).run(attrs, steps, evaluations, forwards, gap)
    rel = gap.abs() / scale.clamp(min=torch.finfo(span.dtype).tiny)
    return AdaptiveIG(_pack(tuple(attrs), is_tuple), steps, rel, gap.abs() <= limit, evaluations, forwards)


class _Panels:
    """Adaptive composite quadrature with per-panel completeness errors, vectorised over samples.

    The rejected ``start_steps``-point root rule is replaced by ``start_steps`` equal panels with one
    Gauss-Legendre node each (never a coarser rule than the one rejected); then, round by round,
    every panel whose error is at least ``SPLIT`` x its sample's largest is halved, until the
    completeness gap (the sum of the panels' errors) is under the limit or ``max_steps`` evaluations
    are spent. Open panels carry
    their gradient sums; a panel whose error is too small ever to be halved is committed to a
    per-sample accumulator, so memory follows the panels that hold error (on ReLU nets: the kinks).
    """

    SPLIT = 0.5

    def __init__(self, model_fn: ModelFn, params: Params, xs: tuple[Tensor, ...], bs: tuple[Tensor, ...],
                 t: ResolvedTarget, todo: Tensor, f_lo: Tensor, f_hi: Tensor, root_gap: Tensor,
                 root: tuple[Tensor, ...], root_steps: int, limit: Tensor, max_steps: int, chunk_size: int | None) -> None:
        self.model_fn, self.params, self.todo = model_fn, params, todo
        self.t = _subset_target(t, todo)
        self.b = tuple(b[todo] for b in bs)
        self.d = tuple(xi[todo] - b for xi, b in zip(xs, self.b))
        m = len(todo)
        dev, dt = f_lo.device, f_lo.dtype
        self.limit, self.max_steps, self.root_steps = limit, max_steps, root_steps
        # a panel with less error than this can never be halved again: halving needs error >= SPLIT x the
        # sample's largest, which would then be < limit / max_steps, and with at most max_steps panels
        # the gap would already be under the limit
        self.commit_below = self.SPLIT * limit / max_steps
        self.chunk = None if chunk_size is None else chunk_size * m
        # open panels: sample, interval, f at its ends, quadrature estimate of the integral, gradient sums
        self.s = torch.arange(m, device=dev)
        self.lo, self.hi = torch.zeros(m, dtype=dt, device=dev), torch.ones(m, dtype=dt, device=dev)
        self.f_lo, self.f_hi = f_lo, f_hi
        self.est = root_gap + (f_hi - f_lo)
        self.vec = root
        self.acc = [torch.zeros_like(v) for v in root]
        self.committed_gap = torch.zeros(m, dtype=dt, device=dev)
        self.leaves = torch.ones(m, dtype=torch.long, device=dev)
        self.evals = torch.full((m,), root_steps, dtype=torch.long, device=dev)
        self.fwd = torch.zeros(m, dtype=torch.long, device=dev)
        self.split_root = torch.zeros(m, dtype=torch.bool, device=dev)

    def _err(self) -> Tensor:
        return self.est - (self.f_hi - self.f_lo)

    def total_gap(self) -> Tensor:
        return self.committed_gap.index_add(0, self.s, self._err())

    def run(self, attrs: list[Tensor], steps: Tensor, evaluations: Tensor, forwards: Tensor, gap: Tensor) -> None:
        first = max(2, min(self.root_steps, self.max_steps - self.root_steps))
        self._split(torch.ones_like(self.s, dtype=torch.bool), first)  # every open panel is a root here
        while True:
            err = self._err().abs()
            total = self.total_gap().abs()
            room = (self.max_steps - self.evals) // 2
            active = (total > self.limit) & (room > 0)
            if not bool(active.any()):
                break
            worst = torch.zeros_like(total).scatter_reduce(0, self.s, err, "amax")
            # rank each sample's panels by error, largest first, to keep within its budget
            order = torch.argsort(err, descending=True, stable=True)
            order = order[torch.argsort(self.s[order], stable=True)]
            starts = torch.searchsorted(self.s[order], self.s[order], right=False)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order), device=order.device) - starts
            pick = active[self.s] & (err >= self.SPLIT * worst[self.s]) & (err > 0) & (rank < room[self.s])
            if not bool(pick.any()):
                break
            self._split(pick, 2)
        finals = [acc.index_add(0, self.s, v) * d for acc, v, d in zip(self.acc, self.vec, self.d)]
        split = self.split_root
        rows = self.todo[split]
        for a, f in zip(attrs, finals):
            a[rows] = f[split].to(a.dtype)
        steps[rows] = self.leaves[split]
        evaluations[self.todo] = self.evals
        forwards[self.todo] = self.fwd
        gap[rows] = self.total_gap()[split]

    def _split(self, pick: Tensor, pieces: int) -> None:
        """Cut each picked panel into ``pieces`` equal panels with one Gauss-Legendre node (the midpoint) each."""
        s, lo, hi, f_lo, f_hi = (v[pick] for v in (self.s, self.lo, self.hi, self.f_lo, self.f_hi))
        k = len(s)
        frac = torch.arange(pieces + 1, dtype=lo.dtype, device=lo.device) / pieces
        cuts = lo[None] + frac[:, None] * (hi - lo)[None]  # (pieces + 1, k)
        nodes = (0.5 * (cuts[:-1] + cuts[1:])).reshape(-1)
        rows = s.repeat(pieces)
        grads = self._grads(nodes, rows)
        proj = sum((g * d[rows]).reshape(len(rows), -1).sum(1) for g, d in zip(grads, self.d))
        inner = cuts[1:-1].reshape(-1)
        with torch.no_grad():
            r = s.repeat(pieces - 1)
            pts = tuple(b[r] + _bcast(inner, b) * d[r] for b, d in zip(self.b, self.d))
            f_in = select(self.model_fn(self.params, *pts), _subset_target(self.t, r)).to(lo.dtype).reshape(pieces - 1, k)
        f_cuts = torch.cat([f_lo[None], f_in, f_hi[None]])
        width = (cuts[1:] - cuts[:-1]).reshape(-1)
        new = {
            "s": rows, "lo": cuts[:-1].reshape(-1), "hi": cuts[1:].reshape(-1),
            "f_lo": f_cuts[:-1].reshape(-1), "f_hi": f_cuts[1:].reshape(-1), "est": width * proj.to(width.dtype),
        }
        new_vec = tuple(_bcast(width, g) * g for g in grads)
        err = new["est"] - (new["f_hi"] - new["f_lo"])
        done = err.abs() < self.commit_below[rows]
        self.acc = [a.index_add(0, rows[done], v[done]) for a, v in zip(self.acc, new_vec)]
        self.committed_gap = self.committed_gap.index_add(0, rows[done], err[done])
        keep = ~pick
        for name, value in new.items():
            setattr(self, name, torch.cat([getattr(self, name)[keep], value[~done]]))
        self.vec = tuple(torch.cat([v[keep], nv[~done]]) for v, nv in zip(self.vec, new_vec))
        ones = torch.ones_like(s)
        was_root = self.split_root[s]
        self.leaves = self.leaves.index_add(0, s, (pieces - 1) * was_root.long())  # one panel became `pieces`
        self.leaves[s[~was_root]] = pieces  # the root rule's nodes are replaced
        self.evals = self.evals.index_add(0, s, ones * pieces)
        self.fwd = self.fwd.index_add(0, s, ones * (pieces - 1))
        self.split_root[s] = True

    def _grads(self, nodes: Tensor, rows: Tensor) -> tuple[Tensor, ...]:
        out: list[list[Tensor]] = [[] for _ in self.d]
        step = len(nodes) if self.chunk is None else self.chunk
        for start in range(0, len(nodes), step):
            a, r = nodes[start:start + step], rows[start:start + step]
            pts = tuple(b[r] + _bcast(a, b) * d[r] for b, d in zip(self.b, self.d))
            for acc, g in zip(out, grad_of_selected(self.model_fn, self.params, pts, _subset_target(self.t, r))):
                acc.append(g)
        return tuple(torch.cat(parts) for parts in out)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """``(n,)`` -> ``(n, 1, ..., 1)`` to scale rows of ``like``."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _subset_target(t: ResolvedTarget, rows: Tensor) -> ResolvedTarget:
    if t.kind == "tensor" and t.value.ndim == 1:
        return replace(t, value=t.value.to(rows.device)[rows])
    if isinstance(t.value, PerSampleIndex):
        return replace(t, value=t.value.subset(rows))
    return t
