r"""LRP rules: frozen dataclasses parameterising one generic relevance backward.

For a layer :math:`z = W a + b` (linear, convolution, transposed convolution, average
pooling) a rule is a list of *parts*, each a pair (input modifier, parameter modifier) giving
:math:`z_k = W_k a_k + b_k`; the incoming relevance :math:`R` is divided by a
stabilised sum of part outputs and sent back through each part's transpose
:math:`c_k = W_k^\top (R / z^{stab})`, and the parts recombine as
:math:`R_{in} = \sum_k \pm\, a_k \odot c_k` (or just :math:`c`, for the rules
that redistribute uniformly). The stabiliser is Zennit's:
:math:`z + \epsilon\,\mathrm{sign}(z)` with :math:`\mathrm{sign}(0) = 1`.

Modified weights are computed functionally inside the rule from the parameters
the model is evaluated with; nothing is written to a module. Every rule is
plain tensor code, so ``torch.func.grad`` through ``ax.lrp`` is exact.

References: Bach et al. (2015) PLoS ONE 10(7); Montavon et al. (2017) Pattern
Recognition 65; Montavon et al. (2019) LRP overview, in *Explainable AI*;
Lapuschkin et al. (2019) Nat. Commun. 10 (flat); Andéol et al. (2021) (generalised γ).

The rules for transformers (products, normalisation, softmax, attention) are in
:mod:`attrax.rules.transformer`; :mod:`attrax.rules` re-exports them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._node import _ntuple
from ..rewrite import Site, aten_op, exact_vjp, per_program, plain_eager
from .deeplift import Gradient
from .graph import POOLS, WEIGHTED, dependent_operands, is_relu, region_source, stacked_sum

__all__ = ["AlphaBeta", "Epsilon", "Flat", "Gamma", "Norm", "Pass", "ReLUBetaSmooth", "StackedSumNorm", "WSquare", "ZBox", "ZPlus",
           "damp", "stabilize"]


def stabilize(z: Tensor, epsilon: float, clip: bool = False, norm_scale: bool = False) -> Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) = 1`` (Zennit's stabiliser).

    Zennit's ``Stabilizer(epsilon, clip, norm_scale)`` options: ``norm_scale`` scales ``epsilon`` per
    sample by the root mean square of ``z`` over all dims but the batch dim 0; ``clip`` returns
    ``sign(z) * max(|z|, epsilon)`` (a floor on ``|z|``) instead of the shift.
    """
    if clip or norm_scale:
        with torch.no_grad():
            s = z.sign()
            s = s.abs().neg_().add_(1).add_(s)  # sign with 0 -> 1
        eps: Any = epsilon
        if norm_scale:
            dims = tuple(range(1, z.ndim))
            eps = epsilon * (z.square().mean(dim=dims, keepdim=True).sqrt() if dims else z.abs())
        if clip:
            return s * (z.abs().clamp(min=eps) if isinstance(eps, float) else torch.maximum(z.abs(), eps))
        return z + s * eps
    # float arithmetic rather than torch.where (5-15x a float op on these CPU builds, notes/rewrite.md):
    # sign(z) + 1 - |sign(z)| is sign(z) with 0 -> 1; built without autograd, in place (zero derivative)
    with torch.no_grad():
        s = z.sign()
        shift = s.abs().neg_().add_(1).add_(s).mul_(epsilon)
    return z + shift


def damp(g: Tensor, z: Tensor, epsilon: float, clip: bool = False, norm_scale: bool = False,
         consume: bool = False, plain: bool = False) -> Tensor:
    r"""``g * z / stabilize(z)``: the ε-rule in gradient form (:math:`R = z \odot g` divided by the
    stabilised ``z``, times ``z`` again). ``epsilon == 0`` is LRP-0: ``g`` itself (no division at all).
    ``consume``: nothing reads ``z`` after this (``Site.consumable``), so the result may be written over it;
    ``plain``: the caller knows both are plain eager tensors (``Streams.plain``)."""
    if clip or norm_scale:
        return g * (z / stabilize(z, epsilon if epsilon > 0 else 1e-12, clip, norm_scale)).to(g.dtype)
    if epsilon == 0:
        return g
    # g - eps g / (|z| + eps) = g |z| / (|z| + eps) = g z / (z + eps sign z) with sign(0) = 1 (0 at z = 0):
    # three kernels (abs, add, addcdiv), two buffers; the quotient form took five. Over z where it is
    # consumed: no new buffer (on CPU a new one costs a pass of page faults, ~80 us for an MLP's activations)
    plain = plain or plain_eager(g, z)
    if consume and plain and z.dtype == g.dtype and z.shape == g.shape and z.is_contiguous():
        den = z.abs_().add_(epsilon)
        return torch.addcdiv(g, g, den, value=-epsilon, out=den)
    den = z.abs().to(g.dtype).add_(epsilon)
    if den.shape == g.shape and plain:  # eager: the result written over the buffer made here
        return torch.addcdiv(g, g, den, value=-epsilon, out=den)
    return torch.addcdiv(g, g, den, value=-epsilon)


#: ``f(x) / x`` of activations, for the identity rule in gradient form: SiLU's is the sigmoid, exact GELU's
#: the normal CDF
_RATIOS: dict[str, Callable[[Tensor], Tensor]] = {"silu": torch.sigmoid, "gelu": torch.special.ndtr}


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den`` is exactly 0 (relevance there is ``0 * g`` either way; a quotient
    ``f(0) / tiny`` would overflow for activations with ``f(0) != 0``): ``num den / (den^2 + tiny)``, in
    float32 for float16/bfloat16; no ``torch.where`` (notes/rewrite.md), differentiable and NaN-free at any
    order. Equal to the quotient to rounding wherever ``den^2`` is a normal number (``|den| > 1e-19`` in float32)."""
    if den.dtype in (torch.float16, torch.bfloat16):
        num, den = num.float(), den.float()
    return num * den / torch.addcmul(den.new_tensor(torch.finfo(den.dtype).tiny), den, den)


def _check_zero_params(zero_params: Sequence[str]) -> tuple[str, ...]:
    if isinstance(zero_params, str):
        zero_params = (zero_params,)
    out = tuple(zero_params)
    for p in out:
        if p not in ("weight", "bias"):
            raise ValueError(f"zero_params entries must be 'weight' or 'bias', got {p!r}")
    return out


def _zero_safe(epsilon: float) -> float:
    """The stabiliser for ``epsilon``; 0 means 1e-12, as :class:`Epsilon` (division by an exact zero)."""
    return epsilon if epsilon > 0 else 1e-12


# ------------------------------------------------------------ the generic part


def _input(mode: str, a: Tensor, rule: Any) -> Tensor:
    if mode == "id":
        return a
    if mode == "pos":
        return a.clamp(min=0)
    if mode == "neg":
        return a.clamp(max=0)
    if mode == "ones":
        return torch.ones_like(a)
    if mode in ("low", "high"):
        bound = getattr(rule, mode)
        bound = torch.as_tensor(bound, dtype=a.dtype, device=a.device)
        if bound.ndim == a.ndim:  # (1, C, 1, 1)-style: broadcast over the batch
            return bound.expand_as(a)
        return bound.expand(a.shape[1:]).unsqueeze(0).expand_as(a) if bound.ndim else bound.expand_as(a)
    raise AssertionError(mode)


def _param(mode: str, p: Tensor | None, gamma: float) -> Tensor | None:
    if p is None:
        return None
    if mode == "id":
        return p
    if mode == "pos":
        return p.clamp(min=0)
    if mode == "neg":
        return p.clamp(max=0)
    if mode == "gamma_pos":
        return p + gamma * p.clamp(min=0)
    if mode == "gamma_neg":
        return p + gamma * p.clamp(max=0)
    if mode == "ones":
        return torch.ones_like(p)
    if mode == "square":
        return p * p
    raise AssertionError(mode)


@dataclass(frozen=True)
class _Part:
    input: str
    param: str
    zero_bias: bool = False
    gamma: float = 0.0


@dataclass(frozen=True)
class _Layer:
    """A layer call site: ``forward(a, W, b)`` and the transpose ``back(g, a, W)`` w.r.t. its input."""

    node: Any
    args: list[Any]
    kwargs: dict[str, Any]
    weight: Tensor | None
    bias: Tensor | None

    def forward(self, a: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        op = aten_op(self.node.target)
        if self.weight is None:
            return op(a, *self.args[1:], **self.kwargs)
        rest = self.args[3:]
        return op(a, w, b, *rest, **{k: v for k, v in self.kwargs.items() if k != "bias"})

    def back(self, g: Tensor, a: Tensor, w: Tensor | None, scale: float = 1.0) -> Tensor:
        p = self.node.packet
        if p == "linear":
            return g.matmul(w)
        conv = _conv_arguments(p, self.args) if w is not None and not self.kwargs else None
        if conv is not None:
            nd = w.ndim - 2
            stride, padding, dilation, transposed, output_padding, groups = conv
            return torch.ops.aten.convolution_backward(
                g, a, w, None, _ntuple(stride, nd), _ntuple(padding, nd), _ntuple(dilation, nd), transposed,
                _ntuple(output_padding, nd), groups, [True, False, False],
            )[0]
        # anything else (pools, string-padded convolutions): differentiate the op
        _, pull = torch.func.vjp(lambda t: self.forward(t, w, None if self.bias is None else self.bias) * scale, a)
        return pull(g)[0]


def _conv_arguments(packet: str, args: Sequence[Any]) -> tuple[Any, Any, Any, bool, Any, int] | None:
    """``(stride, padding, dilation, transposed, output_padding, groups)`` of a convolution call, in the
    order of ``aten.convolution_backward``; ``None`` for string padding ("same"/"valid") and non-convolutions.

    ``conv{1,2,3}d(x, w, b, stride, padding, dilation, groups)``,
    ``conv_transpose{1,2,3}d(x, w, b, stride, padding, output_padding, groups, dilation)`` and
    ``convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)``.
    """
    rest = list(args[3:])
    if packet in ("conv1d", "conv2d", "conv3d"):
        if len(rest) > 1 and isinstance(rest[1], str):
            return None
        stride, padding, dilation, groups = (rest + [1, 0, 1, 1][len(rest):])[:4]
        return stride, padding, dilation, False, 0, groups
    if packet in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        stride, padding, output_padding, groups, dilation = (rest + [1, 0, 0, 1, 1][len(rest):])[:5]
        return stride, padding, dilation, True, output_padding, groups
    if packet == "convolution" and len(rest) == 6:
        stride, padding, dilation, transposed, output_padding, groups = rest
        return stride, padding, dilation, bool(transposed), output_padding, groups
    return None


def _layer(site: Site) -> _Layer:
    node, s = site.node, site.streams
    args, kwargs = s.args(node)
    if node.packet in WEIGHTED:
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return _Layer(node, args, kwargs, args[1], bias)
    if node.packet in POOLS:
        return _Layer(node, args, kwargs, None, None)
    raise ValueError(f"LRP layer rules act on (transposed) convolutions, linear and average-pooling layers, not "
                     f"{node.describe()}")


@dataclass(frozen=True)
class _Term:
    """One part of a rule at a site: modified input ``a``, output ``z`` and its transpose."""

    a: Tensor
    z: Tensor
    pull: Callable[[Tensor], Tensor]


def _parts(site: Site, parts: Sequence[_Part], rule: Any, zero_params: tuple[str, ...]) -> list[_Term | None]:
    """The terms of a rule; ``None`` where the part is identically zero.

    A part acting on the negative part of an input that is non-negative by construction (after a
    ReLU, pooling of such, ...; see ``rewrite.nonnegative``) contributes exactly nothing and is
    skipped, which halves the work of z+, alpha-beta and gamma on ReLU networks.
    """
    layer = _layer(site)
    a = layer.args[0]
    source = site.program.nodes[site.node.args[0][1]]
    out: list[_Term | None] = []
    for part in parts:
        if part.input == "neg" and source.nonneg:
            out.append(None)
            continue
        a_k = a if (part.input == "pos" and source.nonneg) else _input(part.input, a, rule)
        if layer.weight is None:  # pooling: implicit weights 1/k >= 0
            scale = {"id": 1.0, "pos": 1.0, "gamma_pos": 1.0 + part.gamma, "neg": 0.0, "gamma_neg": 1.0}.get(part.param)
            if scale is None:
                raise ValueError(f"rule {rule} modifies weights in a way undefined for {site.node.describe()}")
            if scale == 0.0:
                out.append(None)
                continue
            z_k = layer.forward(a_k, None, None) * scale
            out.append(_Term(a_k, z_k, lambda g, a_k=a_k, sc=scale: layer.back(g, a_k, None, sc)))
            continue
        if part.input == "id" and part.param == "id" and not part.zero_bias and not zero_params:
            out.append(_Term(a_k, site.out("x"), _exact_pullback(site)))  # the forward already computed z
            continue
        w_k = torch.zeros_like(layer.weight) if "weight" in zero_params else _param(part.param, layer.weight, part.gamma)
        b_k = None if (part.zero_bias or "bias" in zero_params) else _param(part.param, layer.bias, part.gamma)
        z_k = layer.forward(a_k, w_k, b_k)
        out.append(_Term(a_k, z_k, lambda g, a_k=a_k, w_k=w_k: layer.back(g, a_k, w_k)))
    return out


def _exact_pullback(site: Site) -> Callable[[Tensor], Tensor]:
    s, node = site.streams, site.node
    ref = node.args[0][1]

    def pull(g: Tensor) -> Tensor:
        return exact_vjp(s.program, node, s.x, s.batch, g, s.aux_x)[ref]

    return pull


def _z(*terms: _Term | None) -> Any:
    """Sum of the terms' outputs (0 when all are absent)."""
    total: Any = 0
    for t in terms:
        if t is not None:
            total = total + t.z
    return total


def _back(term: _Term | None, s: Tensor) -> Any:
    """``a_k * W_k^T s`` for one term (0 when absent)."""
    return 0 if term is None else term.a * term.pull(s)


def _result(site: Site, relevance: Any) -> dict[int, Any]:
    if not isinstance(relevance, Tensor):  # every term vanished
        relevance = torch.zeros_like(site.args("x")[0])
    return {site.node.args[0][1]: relevance}


# ------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Epsilon:
    r"""LRP-ε [Bach et al. 2015]: :math:`R_i = a_i \sum_j w_{ij} R_j / (z_j + \epsilon\,\mathrm{sign}(z_j))`.

    ``epsilon=0`` is LRP-0 (with a zero-safe stabiliser of 1e-12 only where z is exactly 0).
    Keyword options ``clip`` and ``norm_scale`` are Zennit's ``Stabilizer`` options (see :func:`stabilize`).
    """

    epsilon: float = 1e-6
    zero_params: tuple[str, ...] = ()
    clip: bool = field(default=False, kw_only=True)
    norm_scale: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        (t,) = _parts(site, [_Part("id", "id")], self, self.zero_params)
        eps = self.epsilon if self.epsilon > 0 else 1e-12
        return _result(site, _back(t, r / stabilize(_z(t), eps, self.clip, self.norm_scale)))

    def gradient(self, site: Site, g: Tensor) -> dict[int, Any]:
        """The rule in gradient form (see :func:`gradient_form`): the true transpose of ``g * z / stab(z)``."""
        s = site.streams
        g = damp(g, site.out("x"), self.epsilon, self.clip, self.norm_scale, site.consumable(), site.streams.plain)
        return {site.node.args[0][1]: exact_vjp(s.program, site.node, s.x, s.batch, g, s.aux_x)[site.node.args[0][1]]}


@dataclass(frozen=True)
class Gamma:
    r"""Generalised LRP-γ [Montavon et al. 2019; Andéol et al. 2021], as in Zennit.

    Positive outputs take relevance in proportion to the γ-boosted positive contributions
    :math:`a^+ (W + \gamma W^+) + a^- (W + \gamma W^-)`, negative outputs in proportion to
    the boosted negative ones; ``gamma_negative`` (default: ``gamma``) sets the boost of the
    negative branch separately.
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6
    zero_params: tuple[str, ...] = ()
    gamma_negative: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))
        if not self.gamma >= 0 or (self.gamma_negative is not None and not self.gamma_negative >= 0):
            raise ValueError(f"gamma must be >= 0, got {self.gamma} / {self.gamma_negative}")

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        g_pos = self.gamma
        g_neg = self.gamma if self.gamma_negative is None else self.gamma_negative
        parts = [
            _Part("pos", "gamma_pos", gamma=g_pos),
            _Part("neg", "gamma_neg", zero_bias=True, gamma=g_pos),
            _Part("pos", "gamma_neg", gamma=g_neg),
            _Part("neg", "gamma_pos", zero_bias=True, gamma=g_neg),
        ]
        t1, t2, t3, t4 = _parts(site, parts, self, self.zero_params)
        z = site.out("x")
        pos = r * (z > 0).to(r.dtype) / stabilize(_z(t1, t2), self.stabilizer)
        neg = r * (z < 0).to(r.dtype) / stabilize(_z(t3, t4), self.stabilizer)
        return _result(site, _back(t1, pos) + _back(t2, pos) + _back(t3, neg) + _back(t4, neg))


@dataclass(frozen=True)
class ZPlus:
    r"""LRP-z⁺ [Montavon et al. 2017] in its sign-aware form (α=1, β=0):
    :math:`R_i = \sum_j (a_i^+ w_{ij}^+ + a_i^- w_{ij}^-) R_j / \sum_i (a_i^+ w_{ij}^+ + a_i^- w_{ij}^-)`."""

    stabilizer: float = 1e-6
    zero_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        t1, t2 = _parts(site, [_Part("pos", "pos"), _Part("neg", "neg", zero_bias=True)], self, self.zero_params)
        s = r / stabilize(_z(t1, t2), self.stabilizer)
        return _result(site, _back(t1, s) + _back(t2, s))


@dataclass(frozen=True)
class AlphaBeta:
    r"""LRP-αβ [Bach et al. 2015]: positive contributions weighted by α, negative by β.

    Conservative when α − β = 1 (both must be non-negative), as Zennit requires.
    """

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    zero_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be non-negative, got alpha={self.alpha}, beta={self.beta}")
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ValueError(f"alpha - beta must equal 1, got alpha={self.alpha}, beta={self.beta}")

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        parts = [_Part("pos", "pos"), _Part("neg", "neg", zero_bias=True), _Part("pos", "neg"),
                 _Part("neg", "pos", zero_bias=True)]
        t1, t2, t3, t4 = _parts(site, parts, self, self.zero_params)
        s_pos = r / stabilize(_z(t1, t2), self.stabilizer)
        s_neg = r / stabilize(_z(t3, t4), self.stabilizer)
        rel = self.alpha * (_back(t1, s_pos) + _back(t2, s_pos)) - self.beta * (_back(t3, s_neg) + _back(t4, s_neg))
        return _result(site, rel)


@dataclass(frozen=True)
class Flat:
    """LRP-flat [Lapuschkin et al. 2019]: relevance spread uniformly over the receptive field
    (inputs and weights replaced by ones, bias dropped)."""

    stabilizer: float = 1e-6
    zero_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        (t,) = _parts(site, [_Part("ones", "ones", zero_bias=True)], self, self.zero_params)
        assert t is not None
        return _result(site, t.pull(r / stabilize(t.z, self.stabilizer)))


@dataclass(frozen=True)
class WSquare:
    """LRP-w² [Montavon et al. 2017]: relevance in proportion to squared weights (inputs ignored)."""

    stabilizer: float = 1e-6
    zero_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        (t,) = _parts(site, [_Part("ones", "square")], self, self.zero_params)
        assert t is not None
        return _result(site, t.pull(r / stabilize(t.z, self.stabilizer)))


@dataclass(frozen=True)
class ZBox:
    r"""LRP-z^B [Montavon et al. 2017] for inputs bounded in ``[low, high]`` (floats, or tensors
    broadcastable to one sample, e.g. ``(1, C, 1, 1)`` per channel):
    :math:`R_i = \sum_j (a_i w_{ij} - l_i w_{ij}^+ - h_i w_{ij}^-) R_j / \sum_i (\cdot)`."""

    low: Any = -3.0
    high: Any = 3.0
    stabilizer: float = 1e-6
    zero_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        parts = [_Part("id", "id"), _Part("low", "pos"), _Part("high", "neg")]
        t1, t2, t3 = _parts(site, parts, self, self.zero_params)
        s = r / stabilize(_z(t1) - _z(t2) - _z(t3), self.stabilizer)
        return _result(site, _back(t1, s) - _back(t2, s) - _back(t3, s))


def _pass_source(program: Any, node: Any, ops: list[tuple[int, int]]) -> int | None:
    """The tensor :class:`Pass` hands relevance to: the op's single input, or the source of an elementwise region."""
    src = ops[0][1] if len(ops) == 1 and ops[0][0] == 0 else None
    if src is None:
        src = region_source(program, node)
        if src is None and len(ops) == 1:
            src = ops[0][1]
    return src


@dataclass(frozen=True)
class Pass:
    """Relevance passes through unchanged (the identity rule, for elementwise functions such as
    activations).

    At the root of an elementwise region (a product or sum of elementwise functions of one tensor
    ``s``, e.g. a written-out GELU or ``x * sigmoid(x)``; see :func:`region_source`) the whole region
    is one elementwise function of ``s``, and the relevance goes to ``s`` directly.
    """

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        node, s = site.node, site.streams
        ops = dependent_operands(node)
        if len(ops) != 1 or ops[0][0] != 0:
            src = region_source(s.program, node)
            if src is None and len(ops) == 1:
                src = ops[0][1]
            if src is None or s.x[src].shape != r.shape:
                raise ValueError(f"Pass applies to elementwise functions of one tensor only, not {node.describe()}")
            return {src: r.to(s.x[src].dtype)}
        x = site.args("x")[0]
        if x.shape != r.shape:
            raise ValueError(f"Pass applies to shape-preserving ops only, not {node.describe()}")
        return _result(site, r)

    def gradient(self, site: Site, g: Tensor) -> dict[int, Any]:
        """Gradient form: ``g * f(x) / x`` (relevance ``x * g_in = f(x) * g`` passes unchanged)."""
        node, s = site.node, site.streams
        ops = dependent_operands(node)
        if torch.compiler.is_compiling():
            src = _pass_source(s.program, node, ops)
        else:  # a written-out GELU's region is found by walking it: once per program
            sources = per_program(s.program, "pass_sources", lambda p: {})
            src = sources.get(node.index, -1)
            if src == -1:
                src = sources[node.index] = _pass_source(s.program, node, ops)
        out = site.out("x")
        if src is None or s.x[src].shape != g.shape or out.shape != g.shape:
            raise ValueError(f"Pass applies to shape-preserving elementwise functions of one tensor only, not "
                             f"{node.describe()}")
        x = s.x[src]
        # in place where plain eager in one dtype: each new buffer costs a pass of page faults on CPU (an MLP's
        # activations at seq 128: ~80 us each); the same operations in the same order, so the same values
        own = g.dtype == x.dtype == out.dtype and x.dtype not in (torch.float16, torch.bfloat16) and (s.plain or plain_eager(g, x, out))
        # the node's own value is dead once this rule ran (Site.consumable): the ratio is written over it
        over = own and out.is_contiguous() and site.consumable()
        if src == ops[0][1] and node.packet in _RATIOS and len(node.args) == 1 and not node.kwargs:
            # f(x) / x in one kernel, without dividing (at x = 0 the relevance x * g_in is 0 either way)
            ratio = _RATIOS[node.packet]
            if own:
                return {src: (ratio(x, out=out) if over else ratio(x)).mul_(g)}
            return {src: g * ratio(x).to(g.dtype)}
        if own:  # _ratio(out, x) * g
            num = out.mul_(x) if over else out * x
            return {src: num.div_(torch.addcmul(x.new_tensor(torch.finfo(x.dtype).tiny), x, x)).mul_(g)}
        return {src: g * _ratio(out, x).to(g.dtype)}


@dataclass(frozen=True)
class Norm:
    r"""Relevance in proportion to each input's contribution, for parameter-free linear
    operations (residual sums, average pooling, means, scaling):
    :math:`R_{in,k} = a_k \odot J_k^\top (R / \mathrm{stab}(\mathrm{out}))`.

    ``stabilizer=0`` uses 1e-12, as ``Epsilon(0)`` (an exactly zero output would divide 0 by 0).
    Keyword options ``clip`` and ``norm_scale`` are Zennit's ``Stabilizer`` options (see :func:`stabilize`).
    """

    stabilizer: float = 1e-6
    clip: bool = field(default=False, kw_only=True)
    norm_scale: bool = field(default=False, kw_only=True)

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        s, node = site.streams, site.node
        ratio = r / stabilize(site.out("x"), _zero_safe(self.stabilizer), self.clip, self.norm_scale)
        grads = exact_vjp(s.program, node, s.x, s.batch, ratio, s.aux_x)
        return {ref: s.x[ref] * g for ref, g in grads.items()}

    def gradient(self, site: Site, g: Tensor) -> dict[int, Any]:
        """Gradient form: the true transpose of ``g * out / stab(out)``."""
        s = site.streams
        g = damp(g, site.out("x"), self.stabilizer, self.clip, self.norm_scale, site.consumable(), site.streams.plain)
        return exact_vjp(s.program, site.node, s.x, s.batch, g, s.aux_x)


@dataclass(frozen=True)
class StackedSumNorm:
    """:class:`Norm` at a sum of stacked tensors (:func:`stacked_sum`: Zennit's ``Sum`` module,
    ``torch.stack([a, b], -1).sum(-1)``), the exact gradient at any other op it is given.

    For composites whose default is the gradient (``excitation_backprop``) on parameter-free linear
    ops (``Kind("arithmetic")``): a residual sum gets Norm whether written ``a + b`` or as a stack.
    """

    stabilizer: float = 1e-6
    clip: bool = field(default=False, kw_only=True)
    norm_scale: bool = field(default=False, kw_only=True)

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        if stacked_sum(site.program, site.node):
            return Norm(self.stabilizer, clip=self.clip, norm_scale=self.norm_scale).backward(site, r)
        return Gradient().backward(site, r)


@dataclass(frozen=True)
class ReLUBetaSmooth:
    r"""A ReLU's gradient replaced by softplus's, :math:`\sigma(\beta x)` [Dombrowski et al. 2019]
    (Zennit's ``ReLUBetaSmooth``): :math:`g_{in} = g \odot \sigma(\beta x)`. A smooth surrogate for
    second-order gradients through ReLU networks; see ``ax.composites.beta_smooth``.

    Dombrowski et al. (2019), Explanations can be manipulated and geometry is to blame, NeurIPS.
    """

    beta_smooth: float = 10.0

    def backward(self, site: Site, g: Tensor) -> dict[int, Any]:
        node = site.node
        if not is_relu(node):
            raise ValueError(f"rule ReLUBetaSmooth applies to ReLUs only, not {node.describe()}")
        x = site.args("x")[0]
        return {node.args[0][1]: g * torch.sigmoid(self.beta_smooth * x).to(g.dtype)}
