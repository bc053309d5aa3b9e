r"""LRP rules for transformers: products, normalisation, softmax and attention.

Products of two activations, normalisation scales and softmax in the relevance form of AttnLRP
(Achtibat et al. 2024) and CP-LRP (Ali et al. 2022). Each rule below equals gradient x input
with the corresponding modified gradient (LXT's "efficient" formulation) when epsilon -> 0:
relevance at a node is its value times the modified gradient there, so a rule that only halves
or blocks a gradient needs no division (``notes/lrp.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._decompose import scaled_dot_product_attention as _written_out_attention
from ..rewrite import Site, aten_op, exact_vjp, plain_eager
from .graph import ELEMENTWISE_PRODUCTS, dependent_operands, scale_operand
from .lrp import _ratio, _zero_safe, damp, stabilize

__all__ = ["Attention", "HoldScale", "SoftmaxTaylor", "Uniform"]


def _contraction_pullbacks(node: Any, a: Tensor, b: Tensor, ratio: Tensor, want: Sequence[int]) -> list[Any] | None:
    """Cotangents of the two operands of a matmul/mm/bmm (those in ``want``) by explicit transposes,
    without recomputing the product; None where that does not apply (1-d operands, einsum)."""
    if node.packet not in ("matmul", "mm", "bmm") or node.kwargs or a.ndim < 2 or b.ndim < 2:
        return None
    return [
        ratio.matmul(b.transpose(-1, -2).to(ratio.dtype)).sum_to_size(a.shape) if 0 in want else None,
        a.transpose(-1, -2).to(ratio.dtype).matmul(ratio).sum_to_size(b.shape) if 1 in want else None,
    ]


def _product_relevance(site: Site, r: Tensor, shares: Sequence[float], epsilon: float) -> dict[int, Any]:
    r"""Relevance of the two operands of a product, the k-th (in argument order) taking ``shares[k]``.

    Elementwise (``mul``/``div``): each output is one term, so an operand gets ``share * R``
    (summed over its broadcast dims), no division. Contractions: the ε-rule with the other operand
    as the weights, :math:`R_a = \mathrm{share}\; a \odot J_a^\top (R / \mathrm{stab}(y))`.
    """
    node, s = site.node, site.streams
    refs = [i for _, i in dependent_operands(node)]
    want = [k for k in (0, 1) if shares[k]]
    res: dict[int, Any] = {}

    def put(ref: int, rel: Tensor) -> None:
        res[ref] = rel if ref not in res else res[ref] + rel

    if node.packet in ELEMENTWISE_PRODUCTS:
        for k in want:
            put(refs[k], (r * shares[k] if shares[k] != 1 else r).sum_to_size(s.x[refs[k]].shape))
        return res
    ratio = r / stabilize(site.out("x"), _zero_safe(epsilon))
    pulls = _contraction_pullbacks(node, s.x[refs[0]], s.x[refs[1]], ratio, want)
    if pulls is None:  # einsum, 1-d operands: the op's own vjp (both operands; one node twice: summed)
        by_ref = exact_vjp(s.program, node, s.x, s.batch, ratio, s.aux_x)
        if refs[0] == refs[1]:
            return {refs[0]: shares[0] * s.x[refs[0]] * by_ref[refs[0]]}
        pulls = [by_ref[refs[0]], by_ref[refs[1]]]
    for k in want:  # pulls[k] is a fresh buffer: scaled in place
        rel = pulls[k] * s.x[refs[k]]
        put(refs[k], rel.mul_(shares[k]) if shares[k] != 1 else rel)
    return res


def _product_gradient(site: Site, g: Tensor, shares: Sequence[float], epsilon: float) -> dict[int, Any]:
    """:func:`_product_relevance` in gradient form: operand k gets ``shares[k]`` times its true vjp
    (contractions of ``g * y / stab(y)``); a denominator's share of ``a / b`` is ``-share`` times its vjp
    (relevance ``b * g_b = share * (a / b) * g``)."""
    node, s = site.node, site.streams
    ops = dependent_operands(node)
    refs = [i for _, i in ops]
    want = [k for k in (0, 1) if shares[k]]
    res: dict[int, Any] = {}

    def put(ref: int, v: Tensor) -> None:
        res[ref] = v if ref not in res else res[ref] + v

    if node.packet in ELEMENTWISE_PRODUCTS:
        a, b = s.x[refs[0]], s.x[refs[1]]
        for k in want:
            if node.packet == "mul":
                v = g * (b if k == 0 else a).to(g.dtype)
            elif k == 0:
                v = g / b.to(g.dtype)
            else:  # relevance share * (a / b) * g at b
                v = g * _ratio(site.out("x"), b).to(g.dtype)
            put(refs[k], _scaled(v.sum_to_size(s.x[refs[k]].shape), shares[k], True, s.plain))
        return res
    g = damp(g, site.out("x"), epsilon, plain=s.plain)
    pulls = _contraction_pullbacks(node, s.x[refs[0]], s.x[refs[1]], g, want)
    fresh = pulls is not None  # products made here (an op's vjp may hand back g itself)
    if pulls is None:
        by_ref = exact_vjp(s.program, node, s.x, s.batch, g, s.aux_x)
        if refs[0] == refs[1]:
            return {refs[0]: shares[0] * by_ref[refs[0]]}
        pulls = [by_ref[refs[0]], by_ref[refs[1]]]
    for k in want:
        put(refs[k], _scaled(pulls[k], shares[k], fresh, s.plain))
    return res


def _scaled(v: Tensor, share: float, fresh: bool, plain: bool = False) -> Tensor:
    """``v * share``; in place where ``v`` is a buffer the caller made and owns (``fresh``) and plain eager: a new
    buffer costs a pass of page faults on CPU (a product site's operands at seq 128: ~80 us each, in place ~15)."""
    if share == 1:
        return v
    return v.mul_(share) if fresh and (plain or plain_eager(v)) else v * share


@dataclass(frozen=True)
class Uniform:
    r"""The uniform rule for a product of two activations [AttnLRP, Eq. 7]: each operand receives
    half of the relevance.

    ``a * b`` (elementwise): :math:`R_a = R_b = R/2` (summed over broadcast dims), no division.
    ``a @ b`` (matmul, bmm, einsum): the ε-rule with either operand as the weights of the other,
    halved: :math:`R_{a_{ik}} = \tfrac12 \sum_j a_{ik} b_{kj} R_{ij} / (y_{ij} + \epsilon\,\mathrm{sign}(y_{ij}))`.
    In gradient x input terms (ε → 0) this halves the gradient through each operand (LXT's
    ``divide_gradient``).
    """

    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        ops = dependent_operands(site.node)
        if len(ops) != 2:
            raise ValueError(f"Uniform applies to products of two activations, not {site.node.describe()}")
        return _product_relevance(site, r, (0.5, 0.5), self.epsilon)

    def gradient(self, site: Site, g: Tensor) -> dict[int, Any]:
        """Gradient form: each operand's vjp halved (LXT's ``divide_gradient``)."""
        if len(dependent_operands(site.node)) != 2:
            raise ValueError(f"Uniform applies to products of two activations, not {site.node.describe()}")
        return _product_gradient(site, g, (0.5, 0.5), self.epsilon)


@dataclass(frozen=True)
class HoldScale:
    r"""A product with one operand held constant: all relevance goes to the other operand.

    The constant operand is the normalisation scale (``x * rsqrt(var + eps)``, the denominator of
    ``(x - u) / sqrt(s + eps)``), or the gate: the one operand that came from a nonlinearity
    (``act(g) * u``, ``x * sigmoid(fc(pool(x)))``, the attention weights in ``softmax(q k^T) @ v``);
    see :func:`scale_operand`. Elementwise: :math:`R_a = R`; contractions: the ε-rule with the
    held operand as the weights. Where no operand qualifies (``q @ k^T``) it is :class:`Uniform`.
    This is LXT's ``stop_gradient`` (CP-LRP, Ali et al. 2022) and AttnLRP's identity rule on
    normalisation layers.
    """

    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        ops = dependent_operands(site.node)
        if len(ops) != 2:
            raise ValueError(f"HoldScale applies to products of two activations, not {site.node.describe()}")
        held = scale_operand(site.program, site.node)
        shares = (0.5, 0.5) if held is None else (0.0, 1.0) if held == 0 else (1.0, 0.0)
        return _product_relevance(site, r, shares, self.epsilon)

    def gradient(self, site: Site, g: Tensor) -> dict[int, Any]:
        """Gradient form: the held operand's vjp is dropped (LXT's ``stop_gradient``)."""
        if len(dependent_operands(site.node)) != 2:
            raise ValueError(f"HoldScale applies to products of two activations, not {site.node.describe()}")
        held = scale_operand(site.program, site.node)
        shares = (0.5, 0.5) if held is None else (0.0, 1.0) if held == 0 else (1.0, 0.0)
        return _product_gradient(site, g, shares, self.epsilon)


@dataclass(frozen=True)
class SoftmaxTaylor:
    r"""AttnLRP's softmax rule [Achtibat et al. 2024, Prop. 3.1]: the first-order Taylor
    decomposition at the input, :math:`R_x = x \odot (R - s \textstyle\sum R)` along the softmax
    dim (:math:`s` the softmax output, :math:`R` its relevance), i.e. gradient x input with the
    true softmax gradient. Not conservative: the bias term :math:`\sum R - \sum R_x` is dropped.

    Log-softmax :math:`z`: :math:`R_x = x \odot (g - e^z \sum g)` with
    :math:`g = R / (z + \epsilon\,\mathrm{sign}(z))`.
    """

    epsilon: float = 1e-6

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        node = site.node
        if node.packet not in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
            raise ValueError(f"SoftmaxTaylor applies to softmax and log-softmax, not {node.describe()}")
        args = site.args("x")
        x, dim, out = args[0], args[1], site.out("x")
        if node.packet in ("log_softmax", "_log_softmax"):
            r = r / stabilize(out, _zero_safe(self.epsilon))
            out = torch.exp(out)
        # x * (R - s * sum R). A score masked with -inf (a hand-written masked_fill) has s = 0 and R = 0:
        # clamped to the lowest finite value its relevance is 0, and so is its derivative (not -inf * 0)
        x = x.clamp(min=torch.finfo(x.dtype).min)
        t = torch.addcmul(r, out.to(r.dtype), r.sum(dim, keepdim=True), value=-1)
        return {node.args[0][1]: t.mul_(x) if t.dtype == x.dtype else t * x}

    def gradient(self, site: Site, g: Tensor) -> dict[int, Any]:
        """Gradient form: the true softmax vjp ``s * (g - sum(s * g))`` (log-softmax: of ``g * z / stab(z)``)."""
        node = site.node
        if node.packet not in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
            raise ValueError(f"SoftmaxTaylor applies to softmax and log-softmax, not {node.describe()}")
        dim, out = site.args("x")[1], site.out("x")
        if node.packet in ("log_softmax", "_log_softmax"):
            g = damp(g, out, _zero_safe(self.epsilon))
            return {node.args[0][1]: torch.addcmul(g, torch.exp(out).to(g.dtype), g.sum(dim, keepdim=True), value=-1)}
        sg = g * out.to(g.dtype)
        return {node.args[0][1]: torch.addcmul(sg, out.to(g.dtype), sg.sum(dim, keepdim=True), value=-1)}


def _transformed(t: Any) -> bool:
    """``t`` requires grad or is wrapped by a ``torch.func`` transform (grad, vmap)."""
    if not isinstance(t, Tensor):
        return False
    from torch._C._functorch import is_functorch_wrapped_tensor

    return t.requires_grad or is_functorch_wrapped_tensor(t)


@dataclass(frozen=True)
class Attention:
    r"""``scaled_dot_product_attention`` kept as one node (``softmax(q k^T s + m) v``), in gradient form only.

    AttnLRP on the decomposed attention is: ``attention @ v`` by the uniform rule (each operand half),
    the softmax by its Taylor rule (its true vjp in gradient form), the scale and mask by LRP-0 (their
    vjp) and ``q @ k^T`` by the uniform rule again: the fused kernel's own vjp of ``g * out / stab(out)``
    with the query's and key's parts times 1/4 and the value's times 1/2 (the defaults). CP-LRP holds the
    attention weights: ``(0, 0, 1)``. ``epsilon`` stabilises at the output; the uniform rule's ε inside
    (on the scores) is the one difference from the decomposed graph (relative ε / |score|). The reverse
    recomputes the kernel's forward inside its backward, so no T x T tensor is kept: memory as one
    forward + backward of the model. Dropout must be off (eval mode).
    """

    query: float = 0.25
    key: float = 0.25
    value: float = 0.5
    epsilon: float = 1e-6

    def shares(self, node: Any) -> tuple[float, float, float]:
        """The parts of q, k and v at this call: the fields where all three depend on the input; otherwise
        what the written-out graph gives, where a product with one input-dependent operand is linear
        (LRP-0, all to it): with v constant the attention weights get everything, with q and k constant v
        does, and within the scores a single input-dependent operand takes the scores' whole part."""
        dq, dk, dv = (any(pos == k for pos, _ in dependent_operands(node)) for k in range(3))
        weights = self.query + self.key if dv else 1.0
        if not (dq or dk):
            return 0.0, 0.0, 1.0 if dv else 0.0
        if dq and dk:
            both = self.query + self.key
            fq = self.query / both if both else 0.5
            return weights * fq, weights * (1 - fq), self.value if dv else 0.0
        return (weights if dq else 0.0), (weights if dk else 0.0), self.value if dv else 0.0

    def at_site(self, node: Any) -> Attention:
        """This rule with :meth:`shares` at ``node`` as its fields (the LRP plan holds one per call site)."""
        q, k, v = self.shares(node)
        return Attention(q, k, v, self.epsilon)

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        raise ValueError(f"rule Attention at {site.node.describe()} runs in gradient form only (lrp(form='auto'), "
                         f"with every other rule having a gradient form too)")

    def gradient(self, site: Site, g: Tensor) -> dict[int, Any]:
        node, s = site.node, site.streams
        if node.packet != "scaled_dot_product_attention":
            raise ValueError(f"rule Attention applies to scaled_dot_product_attention, not {node.describe()}")
        args, kwargs = s.args(node)
        dropout = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
        if dropout:
            raise ValueError(f"{node.describe()} has dropout_p={dropout}: put the model in eval mode for LRP")
        shares = (self.query, self.key, self.value)  # resolved for this call site by the plan (at_site)
        wanted = [(pos, ref) for pos, ref in dependent_operands(node) if pos < 3 and shares[pos]]
        if not wanted:
            return {}
        g = damp(g, site.out("x"), self.epsilon, plain=s.plain)
        pull = s.aux_x.get(node.index)  # the vjp taken with the forward (rewrite.forward), where it was
        if pull is None:
            # the fused kernels have no double backward and no vmap rule for their backward: where this vjp is
            # differentiated (torch.func.grad, autograd w.r.t. params), batched (vmap over targets) or compiled,
            # the same attention written out (_decompose), differentiable at any order
            written_out = torch.compiler.is_compiling() or any(_transformed(t) for t in (*args[:3], g))
            op: Any = _written_out_attention if written_out else aten_op(node.target)

            def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return op(q, k, v, *args[3:], **kwargs)

            _, pull = torch.func.vjp(attend, *args[:3])
        grads = pull(g.to(site.out("x").dtype))
        res: dict[int, Any] = {}
        for pos, ref in wanted:  # the vjp's outputs are its own buffers (in place where no two are one tensor)
            fresh = not any(grads[pos] is grads[j] for j in range(len(grads)) if j != pos)
            v = _scaled(grads[pos].to(g.dtype), shares[pos], fresh, s.plain)
            res[ref] = v if ref not in res else res[ref] + v
        return res
