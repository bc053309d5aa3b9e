r"""DeepLift, guided backprop and deconvnet rules, and the exact gradient.

A rule is a frozen dataclass with one method, ``backward(site, g)``, mapping the
cotangent ``g`` arriving at a node's output to cotangents for the node's
input-dependent arguments. It is written in ordinary differentiable tensor ops,
so a rule composes with ``torch.func.grad`` (true second-order gradients),
``vmap`` and ``torch.compile``; ``notes/rewrite.md`` explains why this form was
chosen over custom ``autograd.Function`` s.

This module holds the rules for the modified-gradient methods: the exact
gradient, DeepLift's rescale family, guided backprop and deconvnet. LRP's rules
live in :mod:`attrax.rules.lrp` and :mod:`attrax.rules.transformer`, the graph
predicates in :mod:`attrax.rules.graph`; :mod:`attrax.rules` re-exports them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..rewrite import Node, Site, exact_vjp, generic_vjp, pool_params, run_node, unpool
from .graph import is_relu

__all__ = ["Bilinear", "CrossMax", "DeconvReLU", "DisjointCrossMax", "Gradient", "GuidedReLU", "NormScale", "ReduceCrossMax",
           "ReluMaxPool", "Rescale", "SoftmaxRescale", "upcast"]


def tolerance(t: Tensor) -> float:
    """Below this |x - x'| (relative to 1 + |x|) a secant slope is replaced by the derivative at x."""
    return torch.finfo(t.dtype).eps ** 0.75 if t.is_floating_point() else 0.0


# Masks as float arithmetic: bool tensors (comparisons, where, masked_fill) cost 5-15x a float op on
# the CPU builds measured (benchmarks/bench_rules.py); these are exact 0/1 values. Their derivative
# is zero, so they are built without autograd, in place on one fresh buffer: each full-size
# temporary costs a page-faulting allocation here, more than the arithmetic on it.
def is_zero(t: Tensor) -> Tensor:
    """1.0 where ``t == 0``, else 0.0."""
    with torch.no_grad():
        return t.sign().abs_().neg_().add_(1)


def is_positive(t: Tensor) -> Tensor:
    """1.0 where ``t > 0``, else 0.0."""
    with torch.no_grad():
        return t.sign().relu_()


def is_small(d: Tensor, scale: Tensor) -> Tensor:
    """1.0 where ``|d| <= tolerance * scale`` (a secant over ``d`` would lose precision), else 0.0."""
    with torch.no_grad():
        # in-place ops that have vmap batching rules only (clamp_ has none)
        return d.abs().neg_().add_(tolerance(d) * scale).sign_().add_(1).sign_()


def is_small_rel(d: Tensor, x: Tensor) -> Tensor:
    """``is_small(d, 1 + |x|)`` with two allocations instead of four (the rest in place)."""
    tol = tolerance(d)
    with torch.no_grad():
        # |d| - tol |x| - tol <= 0  ->  sign in {-1, 0}  ->  1; > 0  ->  0
        return d.abs().sub_(x.abs(), alpha=tol).sub_(tol).sign_().neg_().add_(1).sign_()


def safe_divide(num: Tensor, den: Tensor, small: Tensor, fallback: Tensor) -> Tensor:
    """``num / den`` where the float mask ``small`` is 0, ``fallback`` where it is 1; NaN-free at any order.

    The denominator is replaced by 1 before dividing (the double-``where`` guard, in float
    arithmetic), so no inf/NaN reaches a gradient through the unused branch; ``lerp`` with a
    0/1 weight returns either end exactly.
    """
    return torch.lerp(num / torch.addcmul(den, small, 1 - den), fallback, small)


# Low-precision streams. The forward streams stay in the model's dtype (the model is what the user
# runs); the reverse pass carries float32 cotangents for them, and the rules read the stream values
# upcast (exact) so secants, divisions and transposes are float32 arithmetic. float32/float64 streams
# take none of this: every check below is one dtype comparison.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def upcast(t: Any) -> Any:
    """``t`` as float32 if it is a float16/bfloat16 tensor (exact), otherwise ``t`` itself."""
    return t.float() if isinstance(t, Tensor) and t.dtype in LOW_PRECISION else t


def _is_low(v: Any) -> bool:
    if isinstance(v, Tensor):
        return v.dtype in LOW_PRECISION
    return isinstance(v, (tuple, list)) and any(_is_low(e) for e in v)


def _upcast_all(v: Any) -> Any:
    return type(v)(_upcast_all(e) for e in v) if isinstance(v, (tuple, list)) else upcast(v)


def compute_env(node: Node, env: list[Any], g: Any) -> list[Any]:
    """``env`` with the values ``node`` reads (and its output) in float32, where ``g`` is a float32
    cotangent and some of them are float16/bfloat16; otherwise ``env`` itself.

    A cotangent in the stream's own low precision (LRP's relevance) leaves the node as it was.
    """
    for r in node.refs:  # a plain loop: this runs at every node of every float32 pass too
        if _is_low(env[r]):
            break
    else:
        return env
    if _is_low(g):
        return env
    env = list(env)
    for i in (*node.refs, node.index):
        env[i] = _upcast_all(env[i])
    return env


# ----------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Gradient:
    """The exact vector-Jacobian product at the input stream."""

    def backward(self, site: Site, g: Any) -> dict[int, Any]:
        s = site.streams
        return exact_vjp(s.program, site.node, compute_env(site.node, s.x, g), s.batch, g, s.aux_x)


@dataclass(frozen=True)
class Rescale:
    r"""DeepLift's rescale rule for an elementwise nonlinearity :math:`y = f(x)`.

    Multiplier :math:`m = (f(x) - f(x')) / (x - x')`, the secant slope, so that
    :math:`m \Delta x = \Delta y` exactly; where :math:`|x - x'|` is below
    ``tolerance`` (relative :math:`\epsilon^{3/4}`) the derivative :math:`f'(x)`, the
    secant's limit, is used (as Captum's fallback to the gradient).
    Shrikumar, Greenside, Kundaje (2017), Eq. (rescale rule), arXiv:1704.02685.
    """

    def backward(self, site: Site, g: Any) -> dict[int, Any]:
        node = site.node
        x_in = site.args("x")[0]
        x, r = upcast(x_in), upcast(site.args("ref")[0])
        if node.packet in _CLOSED:
            m = _closed_secant(site, x, r)
            if m is not None:
                return {node.args[0][1]: g * m}
        relu = is_relu(node)  # any spelling: clamp(x, min=0) gets the same exact multiplier as relu
        if _is_low(x_in) and not relu:
            # float16/bfloat16 streams: f in float32 at the streams' points, so the secant is not the
            # quotient of two rounded differences (relu needs none: it is exact in any precision)
            dy = _apply(site, x) - _apply(site, r)
        else:
            dy = upcast(site.out("x")) - upcast(site.out("ref"))
        dx = x - r
        if relu:
            # relu's secant has no cancellation (dy == dx exactly where both are active), so only
            # dx == 0 needs the fallback, relu'(x); there dy == 0 too, so m = (dy + [dx=0] relu'(x)) /
            # (dx + [dx=0]): the secant, or the derivative where the input did not move.
            still = is_zero(dx)
            return {node.args[0][1]: g * (torch.addcmul(dy, still, is_positive(x)) / (dx + still))}
        small = is_small_rel(dx, x)
        # f'(x) differs from the secant by O(f'' dx) there, and it is a function of the input stream
        # alone: DeepLiftShap computes it once for all baselines instead of f at every midpoint
        fallback = _derivative(site, x)
        return {node.args[0][1]: g * safe_divide(dy, dx, small, fallback)}


def _closed_secant(site: Site, x: Tensor, r: Tensor) -> Tensor | None:
    r"""The secant :math:`(f(x) - f(x'))/(x - x')` in a closed form without cancellation, for the ops
    that have one; None for the others.

    :math:`x^2`: :math:`x + x'`; :math:`x^3`: :math:`x^2 + x x' + x'^2`; :math:`1/\sqrt{x}`:
    :math:`-y^2 y'^2/(y + y')`; :math:`\sqrt{x}`: :math:`1/(y + y')`; :math:`1/x`: :math:`-y y'`.
    Each is the same function as the secant (the derivative where :math:`x = x'`), so no tolerance
    mask and no derivative fallback are needed, and :math:`m\,\Delta x = \Delta y` holds to rounding
    (normalisation layers' variance and scale, GELU's cube).
    """
    node = site.node
    target = node.target
    if target == "aten.pow.Tensor_Scalar":
        e = site.args("x")[1]
        if isinstance(e, bool) or not isinstance(e, (int, float)):
            return None
        if e == 2:
            return x + r
        if e == 3:
            return torch.addcmul(x * x, r, x + r)
        return None
    if target == "aten.square.default":
        return x + r
    if target in ("aten.rsqrt.default", "aten.sqrt.default", "aten.reciprocal.default"):
        yx, yr = _outs(site, x, r)
        if target == "aten.sqrt.default":
            return 1 / (yx + yr)
        if target == "aten.reciprocal.default":
            return -(yx * yr)
        p = yx * yr
        return -(p * p) / (yx + yr)
    return None


def _outs(site: Site, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """The node's outputs on both streams, in float32 at the streams' points for float16/bfloat16 streams."""
    if x.dtype != site.args("x")[0].dtype:  # upcast: f in float32, not the rounded low-precision outputs
        return _apply(site, x), _apply(site, r)
    return site.out("x"), site.out("ref")


def _apply(site: Site, t: Tensor) -> Tensor:
    """The elementwise node's op at ``t`` (its other arguments from the input stream, in ``t``'s precision)."""
    node, streams = site.node, site.streams
    env = list(compute_env(node, streams.x, t))
    env[node.args[0][1]] = t
    return run_node(streams.program, node, env, streams.batch)


def _derivative(site: Site, at: Tensor) -> Tensor:
    """f'(at) for an elementwise node: in closed form from the node's output for the common activations
    (``at`` is the input stream), otherwise by differentiating the op itself."""
    node = site.node
    if node.packet in _DERIVATIVES and at.dtype == site.args("x")[0].dtype:  # not recomputed in float32
        d = _DERIVATIVES[node.packet](at, site.out("x"))
        if d is not None:
            return d
    # elementwise, so the vjp with ones is the derivative (jvp would load TorchScript decompositions)
    _, pullback = torch.func.vjp(lambda t: _apply(site, t), at)
    return pullback(torch.ones_like(at))[0]


def _d_silu(x: Tensor, y: Tensor) -> Tensor:
    s = torch.sigmoid(x)  # silu' = s + x s (1 - s) = s + y (1 - s)
    return torch.addcmul(s, y, 1 - s)


#: f'(x) from the input ``x`` and the output ``y`` of the same stream, in plain differentiable ops (the
#: aten backward kernels are not all twice differentiable, and ``torch.func.vjp`` of the op costs a
#: forward and a backward with functorch's wrapping at every node)
_DERIVATIVES: dict[str, Any] = {
    "tanh": lambda x, y: 1 - y * y,
    "sigmoid": lambda x, y: y * (1 - y),
    "exp": lambda x, y: y,
    "silu": _d_silu,
    "log": lambda x, y: 1 / x,
}


_CLOSED = frozenset(("pow", "square", "rsqrt", "sqrt", "reciprocal"))


@dataclass(frozen=True)
class CrossMax:
    r"""DeepLift for max pooling, exact per window and per sample.

    For each window, the output difference :math:`\Delta y = \max_w x - \max_w x'` goes
    to the position of the larger of the two maxima: to :math:`\arg\max_w x` when
    :math:`\max x \ge \max x'` (there :math:`\Delta x \ge \Delta y \ge 0`), otherwise to
    :math:`\arg\max_w x'` (there :math:`\Delta x \le \Delta y < 0`), so the receiving
    position always has :math:`|\Delta x| \ge |\Delta y|` and the multiplier
    :math:`\Delta y / \Delta x` lies in [0, 1]. Summation-to-delta holds exactly,
    also when the input equals the reference at the input's maximum.
    """

    def backward(self, site: Site, g: Tensor) -> dict[int, Any]:
        node, s = site.node, site.streams
        args_x, args_r = site.args("x"), site.args("ref")
        x, r = upcast(args_x[0]), upcast(args_r[0])
        nd = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3}[node.packet]
        if nd == 1:  # run as 2-d with a unit height
            k, st, pad, dil, ceil = pool_params(args_x, 1)
            p2 = ([1] + k, [1] + st, [0] + pad, [1] + dil, ceil)
            return {node.args[0][1]: _cross_max(x.unsqueeze(-2), r.unsqueeze(-2), g.unsqueeze(-2), p2, 2).squeeze(-2)}
        indices = (s.aux_x.get(node.index), s.aux_ref.get(node.index))
        outs = (upcast(site.out("x")), upcast(site.out("ref")))
        return {node.args[0][1]: _cross_max(x, r, g, pool_params(args_x, nd), nd, outs, indices)}


def _cross_max(x: Tensor, r: Tensor, g: Tensor, params: tuple[Any, ...], nd: int,
               outs: tuple[Tensor, Tensor] | None = None, indices: tuple[Any, Any] = (None, None)) -> Tensor:
    pool = torch.ops.aten.max_pool2d_with_indices if nd == 2 else torch.ops.aten.max_pool3d_with_indices
    ix, ir = indices
    if ix is None or ir is None or outs is None:
        (yx, ix), (yr, ir) = pool(x, *params), pool(r, *params)
    else:
        yx, yr = outs
    top = torch.maximum(yx, yr)
    to_x = unpool(g * (top - yr), x, params, ix, nd)  # dy when max x >= max x', at argmax x
    to_r = unpool(g * (yx - top), r, params, ir, nd)  # dy when max x <  max x', at argmax x'
    dx = x - r
    # a receiving position has |dx| >= |dy| (see above), so the ratio is bounded: only dx == 0 needs a guard
    return safe_divide(to_x + to_r, dx, is_zero(dx), unpool(g, x, params, ix, nd))


@dataclass(frozen=True)
class DisjointCrossMax:
    r""":class:`CrossMax` for pools whose windows do not overlap, computed at the pooled resolution.

    Each input position belongs to one window, and a window sends :math:`\Delta y` to at most
    two positions (the argmax of either stream), so the multipliers are formed on tensors of
    the pooled size from the inputs gathered at those positions, and one scatter writes the
    cotangent: no full-size difference, ratio or unpooling. The same values as
    :class:`CrossMax` to rounding; chosen by the rewrite pass from the pool's static
    arguments (stride ≥ dilated kernel).
    """

    def backward(self, site: Site, g: Tensor) -> dict[int, Any]:
        node, s = site.node, site.streams
        assert s.ref is not None
        a = node.args[0][1]
        ix, ir = _pool_indices(site)
        return {a: _disjoint_windows(g, site.out("x"), site.out("ref"), ix, ir, s.x[a], s.ref[a], relu=False)}


@dataclass(frozen=True)
class ReluMaxPool:
    r"""DeepLift for ``max_pool(relu(z))`` with non-overlapping windows, as one rule at the pool.

    The same values as :class:`CrossMax` at the pool followed by :class:`Rescale` at the ReLU,
    computed at the pooled resolution like :class:`DisjointCrossMax`: at the (at most two)
    positions per window that receive :math:`\Delta y` the two multipliers telescope,
    :math:`\frac{\Delta y}{\Delta a}\frac{\Delta a}{\Delta z} = \frac{\Delta y}{\Delta z}`, and
    every other position of the ReLU's input gets zero. So one scatter writes the cotangent of
    :math:`z` directly: not even the ReLU's full-size multiplier is built. Chosen by the rewrite
    pass where the ReLU's sole consumer is a 2-d/3-d max pool with disjoint windows.
    """

    def backward(self, site: Site, g: Tensor) -> dict[int, Any]:
        node, s = site.node, site.streams
        assert s.ref is not None
        zi = s.program.nodes[node.args[0][1]].args[0][1]
        ix, ir = _pool_indices(site)
        return {zi: _disjoint_windows(g, site.out("x"), site.out("ref"), ix, ir, s.x[zi], s.ref[zi], relu=True)}


def _pool_indices(site: Site) -> tuple[Tensor, Tensor]:
    """Argmax indices of both streams at a 2-d/3-d max-pool node (recorded by the forward, else recomputed)."""
    node, s = site.node, site.streams
    ix, ir = s.aux_x.get(node.index), s.aux_ref.get(node.index)
    if ix is None or ir is None:
        nd = 2 if node.packet == "max_pool2d" else 3
        pool = torch.ops.aten.max_pool2d_with_indices if nd == 2 else torch.ops.aten.max_pool3d_with_indices
        args_x, args_r = site.args("x"), site.args("ref")
        ix, ir = pool(args_x[0], *pool_params(args_x, nd))[1], pool(args_r[0], *pool_params(args_r, nd))[1]
    return ix, ir


def _disjoint_windows(g: Tensor, yx: Tensor, yr: Tensor, ix: Tensor, ir: Tensor, x: Tensor, r: Tensor,
                      relu: bool) -> Tensor:
    r"""The cross-max cotangent of a disjoint-window max pool, per window, scattered to ``x``'s shape.

    ``x``/``r`` are the pool's input streams, or with ``relu`` the input streams of the ReLU in front
    of it. The window's :math:`\Delta y = y_x - y_r` goes to argmax x when positive (``to_x``) and
    to argmax x' when negative (``to_r``). ``to_x != 0`` means :math:`y_x > y_r \ge r` there, so
    the input moved and :math:`d = y_x - r > 0`; likewise ``to_r != 0`` means
    :math:`d_r = x - y_r < 0` at argmax x'. So the multiplier is :math:`\Delta y / d` wherever
    :math:`\Delta y` is sent, and the denominators are only guarded where nothing is. Where the
    input did not move at argmax x (:math:`d = 0`) the gradient passes: ``g``, times
    relu'(x) for a ReLU. If both argmaxes are one position the two terms add up to
    :math:`\Delta y / d` there. The input at the argmax of its own stream is the pooled value
    (for a ReLU where it matters: :math:`y > 0` means :math:`z = y`, and :math:`y = 0` leaves
    nothing to send from that stream), so only the cross values are gathered.
    """
    ixf, irf = ix.flatten(2), ir.flatten(2)
    # gathered and pooled values only are upcast for low-precision streams (pooled size, exact)
    r_ix, x_ir = upcast(torch.gather(r.flatten(2), 2, ixf)), upcast(torch.gather(x.flatten(2), 2, irf))
    g, yx, yr = g.flatten(2), upcast(yx).flatten(2), upcast(yr).flatten(2)
    dy = yx - yr
    to_x = g * torch.relu(dy)
    to_r = g * dy - to_x
    d = yx - r_ix
    still = is_zero(d)
    at_x = torch.addcmul(to_x, still * is_positive(yx) if relu else still, g) / (d + still)
    d_r = x_ir - yr
    at_r = to_r / (d_r + is_zero(d_r))
    # zeros made from at_x (batched under vmap whenever anything it holds is), filled in place:
    # one write of the full-size map instead of a copy per out-of-place scatter
    out = at_x.new_zeros(r.flatten(2).shape)
    out.scatter_add_(2, ixf, at_x)
    out.scatter_add_(2, irf, at_r)
    return out.reshape(r.shape)


@dataclass(frozen=True)
class SoftmaxRescale:
    r"""DeepLift for softmax / log-softmax along one dim, exact per row, in each stream's own shift.

    Log-softmax is :math:`z = x - L` with :math:`L = \log\sum_k e^{x_k}`; DeepLift's rescale
    rule through :math:`\exp`, the sum and :math:`\log` splits :math:`\Delta L` exactly as
    :math:`\Delta L = \sum_k \mu_k \Delta x_k` with

    .. math:: \mu_k = \frac{(e^{x_k} - e^{x'_k})/\Delta x_k}{(e^{L} - e^{L'})/\Delta L}
              = y'_k\,\frac{\Phi(\Delta x_k)}{\Phi(\Delta L)}, \qquad \Phi(a) = \frac{e^a - 1}{a},

    evaluated as :math:`e^{\epsilon_k}\,\varphi(|\Delta x_k|)/\varphi(|\Delta L|)` with
    :math:`\varphi(d) = -\mathrm{expm1}(-d)/d` and an exponent :math:`\epsilon_k \le 0` taken from
    the per-stream log-softmax values (:math:`z_k + \min(\Delta L, 0)` where :math:`\Delta x_k \ge 0`,
    else :math:`z'_k - \max(\Delta L, 0)`): no shift shared by the streams, so nothing overflows
    and no term cancels another after underflowing (the old form did: ``exp(x' - c)`` underflowed
    where ``c`` was the input's maximum). :math:`0 < \mu_k \le 1` and :math:`\sum_k \mu_k \le 1`.

    The cotangent :math:`g - \mu \sum g` is written as
    :math:`\nu_k g_k - \mu_k \sum_{j \ne k} g_j` with :math:`\nu_k \Delta x_k = \Delta z_k +
    \sum_{j \ne k} \mu_j \Delta x_j` (:math:`= (1 - \mu_k)\Delta x_k`), so
    :math:`\sum_k \Delta x_k\,\partial_k = \sum_k g_k \Delta z_k` holds identically, whatever the
    rounding of :math:`\mu`, against the streams' own :math:`\Delta z`, and the dominant class's
    :math:`1 - \mu_k \approx 0` is never formed by subtraction. The sums over :math:`j \ne k`
    are the row sum less the own term, except at the row's largest term, which is summed over
    the others. Softmax is :math:`y = \exp(z)` after this, with the secant
    :math:`(y - y')/\Delta z` (rescale). Where :math:`\Delta x_k` or :math:`\Delta z_k` is below
    ``tolerance``, :math:`\nu_k = 1 - \mu_k` and :math:`\exp'(z) = y`. Everything is per row,
    O(row length); rows and samples never mix.
    """

    def backward(self, site: Site, g: Tensor) -> dict[int, Any]:
        node = site.node
        args_x = site.args("x")
        x, r, dim = upcast(args_x[0]), upcast(site.args("ref")[0]), args_x[1]
        out_dtype = site.out("x").dtype
        if out_dtype != x.dtype and not _is_low(site.out("x")):  # softmax(x, dtype=float64): its arithmetic in that dtype
            x, r = x.to(out_dtype), r.to(out_dtype)
        log = node.packet in ("log_softmax", "_log_softmax")
        # float16/bfloat16 streams: the op in float32 at the streams' points (as Rescale does)
        low = _is_low(args_x[0])
        if not log and not low:
            # softmax: z = x - L with L = max x - log max y from the stream's own softmax (softmax is
            # monotone, so max y is y at argmax x): row maxima instead of a log-softmax pass (whose exp of
            # attention's masked scores, the dtype's lowest value, takes a slow path), and dL = L - L'
            (z, big), (zr, big_r) = _log_softmax_from(x, site.out("x"), dim), _log_softmax_from(r, site.out("ref"), dim)
            dx, dz, dl = _gap(x, r), _gap(z, zr), big - big_r
        else:
            z, zr = (site.out("x"), site.out("ref")) if log and not low else (torch.log_softmax(x, dim),
                                                                               torch.log_softmax(r, dim))
            dx, dz = _gap(x, r), _gap(z, zr)
            # dL = dx_k - dz_k for every k: taken where z + z' is largest, where both are accurate
            with torch.no_grad():
                k = (z + zr).argmax(dim, keepdim=True)
            dl = dx.gather(dim, k) - dz.gather(dim, k)
        # the exponent, <= 0: z + min(dL, 0) where dx >= 0, z' - max(dL, 0) where dx < 0, i.e. the larger
        if not log:  # softmax: y = exp(z), in float32 at the streams' points for float16/bfloat16 streams
            y, yr = (_exp_clamped(z), _exp_clamped(zr)) if low else (site.out("x"), site.out("ref"))
        if log:
            mu = _exp_clamped(torch.maximum(z - torch.relu(-dl), zr - torch.relu(dl))) * _phi(dx.abs()) / _phi(dl.abs())
        else:
            # exp(z - a) = y exp(-a) with y = exp(z), y' = exp(z'): the exponentials (and 1/phi(|dL|)) are
            # per row (exp is monotone, so the maximum commutes with it), none over attention's T x T scores
            row = _phi(dl.abs())
            e = torch.maximum(y * (torch.exp(-torch.relu(-dl)) / row), yr * (torch.exp(-torch.relu(dl)) / row))
            mu = e * _phi(dx.abs())
        p = mu * dx
        # sum over j != k of p_j: the row sum less p_k, except at the row's largest |p_k|, where the
        # others are summed (one position per row: argmax, not a comparison)
        with torch.no_grad():
            top = p.abs().argmax(dim, keepdim=True)
        others = (p.sum(dim, keepdim=True) - p).scatter(dim, top, p.scatter(dim, top, 0.0).sum(dim, keepdim=True))
        nu = safe_divide(dz + others, dx, is_small_rel(dx, x), 1 - mu)
        if not log:
            # exp's secant (y - y')/(z - z') = max(y, y') phi(|dz|): no cancellation, so no tolerance mask
            # and no fallback (phi(0) = 1 gives exp'(z) = y where z = z')
            g = g * (torch.maximum(y, yr) * _phi(dz.abs()))
        grad = nu * g - mu * (g.sum(dim, keepdim=True) - g)
        return {node.args[0][1]: grad if _is_low(args_x[0]) else grad.to(args_x[0].dtype)}


def _gap(a: Tensor, b: Tensor) -> Tensor:
    """``a - b``, 0 where both are the same infinity (scores masked with -inf in both streams, as hand-written
    attention does: ``inf - inf`` would make the whole row NaN; such a position has softmax 0 in both)."""
    return torch.nan_to_num(a - b, nan=0.0, posinf=math.inf, neginf=-math.inf)


def _phi(d: Tensor) -> Tensor:
    r""":math:`(1 - e^{-d})/d` for :math:`d \ge 0` (1 at 0): the secant of exp over a gap ``d``, over its upper end."""
    with torch.no_grad():
        zero = d.sign().neg_().add_(1)  # d >= 0: 1 - sign(d) is [d == 0]
    return (zero - torch.expm1(-d)) / (d + zero)


def _log_softmax_from(x: Tensor, y: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``log_softmax(x, dim)`` and ``logsumexp(x, dim, keepdim=True)`` given ``y = softmax(x, dim)``:
    ``z = (x - max x) + log max y`` (``x - max x`` is exact near the maximum, as in the log-softmax
    kernel), ``L = max x - log max y``."""
    m, lm = x.amax(dim, keepdim=True), torch.log(y.amax(dim, keepdim=True))
    return (x - m) + lm, m - lm


def _exp_clamped(t: Tensor) -> Tensor:
    """``exp(t)``, with ``t`` clamped at the log of the smallest normal number: below it exp takes a slow
    path on the CPU (7-30x; attention's masked scores sit at the dtype's lowest value), for terms < 1e-38."""
    return torch.exp(t.clamp(min=math.log(torch.finfo(t.dtype).tiny)))


@dataclass(frozen=True)
class Bilinear:
    r"""DeepLift for a product of two input-dependent tensors (mul, matmul, bmm) and division.

    A bilinear map splits its difference exactly and symmetrically (the Shapley
    split of two players): :math:`\Delta(ab) = \Delta a\,\bar b + \bar a\,\Delta b` with
    :math:`\bar a = (a + a')/2`; the backward is therefore the op's vjp at the
    midpoints. For :math:`a / b`:
    :math:`\Delta(a/b) = \Delta a\,\tfrac12(1/b + 1/b') - \Delta b\,\tfrac12(a + a')/(b b')`.
    """

    def backward(self, site: Site, g: Tensor) -> dict[int, Any]:
        node, s = site.node, site.streams
        if node.packet == "div":
            (ax, bx), (ar, br) = map(upcast, site.args("x")[:2]), map(upcast, site.args("ref")[:2])
            res: dict[int, Any] = {}
            ea, eb = node.args[0], node.args[1]
            ga = (g * 0.5 * (1 / bx + 1 / br)).sum_to_size(ax.shape)
            gb = (-g * 0.5 * (ax + ar) / (bx * br)).sum_to_size(bx.shape)
            res[ea[1]] = ga
            res[eb[1]] = res[eb[1]] + gb if eb[1] in res else gb
            return res
        assert s.ref is not None
        if node.packet in ("mul", "mm", "bmm", "matmul") and not node.kwargs:
            out = _midpoint_transpose(site, g)
            if out is not None:
                return out
        mid = list(compute_env(node, s.x, g))
        for r, d in zip(node.refs, node.dep_refs):
            if d:  # in float32 for low-precision streams: their midpoint is not a bf16/f16 number
                mid[r] = (upcast(s.x[r]) + upcast(s.ref[r])) / 2
        return generic_vjp(s.program, node, mid, s.batch, g)


def _midpoint_transpose(site: Site, g: Tensor) -> dict[int, Any] | None:
    """:class:`Bilinear`'s vjp at the midpoints for ``mul`` and (batched) matrix products of two at least
    2-d operands, written as the transposes (``g b^T``, ``a^T g``): the op's forward is not recomputed
    (attention's scores and weighted values are the largest products of a transformer)."""
    node = site.node
    ea, eb = node.args[0], node.args[1]
    if not (isinstance(ea, tuple) and ea[0] == "n" and isinstance(eb, tuple) and eb[0] == "n"):
        return None
    (ax, bx), (ar, br) = site.args("x")[:2], site.args("ref")[:2]
    if not (isinstance(ax, Tensor) and isinstance(bx, Tensor) and isinstance(g, Tensor)):
        return None
    # in float32 for low-precision streams: their midpoint is not a bf16/f16 number
    a, b = torch.lerp(upcast(ax), upcast(ar), 0.5), torch.lerp(upcast(bx), upcast(br), 0.5)
    if node.packet == "mul":
        ga, gb = g * b, g * a
    elif a.ndim >= 2 and b.ndim >= 2 and (node.packet == "matmul" or (a.ndim == b.ndim == (2 if node.packet == "mm" else 3))):
        if g.dtype != a.dtype and g.dtype != b.dtype:  # a model that casts around its product (GPT-J's float32 scores
            g = g.to(torch.promote_types(a.dtype, b.dtype))  # in a float64 model): the product's own precision
        ga, gb = g.matmul(b.transpose(-1, -2)), a.transpose(-1, -2).matmul(g)
    else:
        return None
    ga, gb = ga.sum_to_size(a.shape), gb.sum_to_size(b.shape)
    if ea[1] == eb[1]:
        return {ea[1]: ga + gb}
    return {ea[1]: ga, eb[1]: gb}


@dataclass(frozen=True)
class GuidedReLU:
    """Guided backprop at a ReLU: pass only positive gradient where the input was positive.

    Springenberg et al. (2015), Striving for Simplicity, arXiv:1412.6806.
    """

    def backward(self, site: Site, g: Tensor) -> dict[int, Any]:
        return {site.node.args[0][1]: g.clamp(min=0) * (site.out("x") > 0).to(g.dtype)}


@dataclass(frozen=True)
class DeconvReLU:
    """Deconvnet at a ReLU: rectify the gradient, ignore the forward activation.

    Zeiler, Fergus (2014), Visualizing and Understanding Convolutional Networks.
    """

    def backward(self, site: Site, g: Tensor) -> dict[int, Any]:
        return {site.node.args[0][1]: g.clamp(min=0)}


@dataclass(frozen=True)
class ReduceCrossMax:
    r"""DeepLift for a max or min over one dim (``torch.max(x, dim)``, ``x.min(dim)``) and for
    adaptive max pooling: :class:`CrossMax` with the windows given by the op's own indices.

    Per output, :math:`\Delta y = y_x - y_{x'}` goes to the argmax (argmin) of the stream whose
    extremum is larger (smaller), where :math:`|\Delta x| \ge |\Delta y|`; overlapping adaptive
    windows add their shares. Summation-to-delta holds exactly. Both streams' indices come from
    the forward pass (the op returns them).
    """

    def backward(self, site: Site, g: Any) -> dict[int, Any]:
        node = site.node
        g0 = g[0] if isinstance(g, tuple) else g
        if g0 is None:
            return {}
        (vx, ix), (vr, ir) = site.out("x"), site.out("ref")
        x, r = upcast(site.args("x")[0]), upcast(site.args("ref")[0])
        vx, vr = upcast(vx), upcast(vr)  # float16/bfloat16 streams: float32 arithmetic (the values are exact)
        if node.packet in ("max", "min"):
            dim = site.args("x")[1] % x.ndim
            if not (len(site.args("x")) > 2 and site.args("x")[2]):
                vx, ix, vr, ir, g0 = (t.unsqueeze(dim) for t in (vx, ix, vr, ir, g0))
            flat_x, flat_r = x, r
        else:  # adaptive_max_poolNd: indices are flat over the pooled (trailing) dims
            nd = int(node.packet[-2])
            dim = x.ndim - nd
            flat_x, flat_r = x.flatten(dim), r.flatten(dim)
            vx, ix, vr, ir, g0 = (t.flatten(dim) for t in (vx, ix, vr, ir, g0))
        extreme = torch.minimum(vx, vr) if node.packet == "min" else torch.maximum(vx, vr)
        zeros = torch.zeros_like(flat_x)
        sent = zeros.scatter_add(dim, ix, g0 * (extreme - vr)).scatter_add(dim, ir, g0 * (vx - extreme))
        dx = flat_x - flat_r
        out = safe_divide(sent, dx, is_zero(dx), zeros.scatter_add(dim, ix, g0))
        return {node.args[0][1]: out.reshape(x.shape)}


@dataclass(frozen=True)
class NormScale:
    r"""DeepLift for a value times (or divided by) a normalisation scale: ``c * rsqrt(var + eps)`` in a
    LayerNorm/RMSNorm/GroupNorm, or ``c / sqrt(var + eps)``.

    The split :math:`\Delta(c\,r) = \Delta c\, r_x + c_{x'}\,\Delta r` (and
    :math:`\Delta(c/b) = \Delta c / b_x - \Delta b\, c_{x'} / (b_x b_{x'})`) is exact like the
    symmetric one of :class:`Bilinear`, but has no cancellation when the reference is (nearly)
    constant along the normalised dims: there :math:`c_{x'} \approx 0` and :math:`r_{x'}` is huge
    (:math:`\epsilon^{-1/2}`), and the symmetric split subtracts two terms of size
    :math:`c_x r_{x'}/2` to get :math:`c_x r_x` (measured: float32 DeepLift on torchvision's
    ConvNeXt from a zero image summed to -8e4 for a span of 0.1; exact with this split).
    """

    scale_at: int  # the argument position of the scale

    def backward(self, site: Site, g: Tensor) -> dict[int, Any]:
        node = site.node
        args_x, args_r = site.args("x"), site.args("ref")
        k = self.scale_at
        c_at = 1 - k
        cx, sx = args_x[c_at], args_x[k]
        cr, sr = args_r[c_at], args_r[k]
        if node.packet == "div":  # c / b
            g_c = g / sx
            g_s = -g * cr / (sx * sr)
        else:
            g_c = g * sx
            g_s = g * cr
        return {node.args[c_at][1]: g_c.sum_to_size(cx.shape), node.args[k][1]: g_s.sum_to_size(sx.shape)}
