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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .rewrite import Site, _ntuple, aten_op, exact_vjp

__all__ = ["AlphaBeta", "Attention", "Epsilon", "Flat", "Gamma", "HoldScale", "Norm", "Pass", "ReLUBetaSmooth", "SoftmaxTaylor",
           "StackedSumNorm", "Uniform", "WSquare", "ZBox", "ZPlus", "stabilize", "stacked_sum"]

#: ops whose second/third arguments are (weight, bias): dense layers, convolutions and transposed convolutions
WEIGHTED = frozenset(("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                      "conv_transpose3d", "linear"))
#: parameter-free linear layers that the layer rules also act on (implicit positive weights)
POOLS = frozenset(("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                   "adaptive_avg_pool3d"))


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


def damp(g: Tensor, z: Tensor, epsilon: float, clip: bool = False, norm_scale: bool = False) -> Tensor:
    r"""``g * z / stabilize(z)``: the ε-rule in gradient form (:math:`R = z \odot g` divided by the
    stabilised ``z``, times ``z`` again). ``epsilon == 0`` is LRP-0: ``g`` itself (no division at all)."""
    if clip or norm_scale:
        return g * (z / stabilize(z, epsilon if epsilon > 0 else 1e-12, clip, norm_scale)).to(g.dtype)
    if epsilon == 0:
        return g
    # g - eps g / (|z| + eps) = g |z| / (|z| + eps) = g z / (z + eps sign z) with sign(0) = 1 (0 at z = 0):
    # three kernels (abs, add, addcdiv), two buffers; the quotient form took five
    den = z.abs().to(g.dtype).add_(epsilon)
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


# ------------------------------------------------------------------ the generic part


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


# ----------------------------------------------------------------------- the rules


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
        g = damp(g, site.out("x"), self.epsilon, self.clip, self.norm_scale)
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
        src = ops[0][1] if len(ops) == 1 and ops[0][0] == 0 else None
        if src is None:
            src = region_source(s.program, node)
            if src is None and len(ops) == 1:
                src = ops[0][1]
        out = site.out("x")
        if src is None or s.x[src].shape != g.shape or out.shape != g.shape:
            raise ValueError(f"Pass applies to shape-preserving elementwise functions of one tensor only, not "
                             f"{node.describe()}")
        x = s.x[src]
        if src == ops[0][1] and node.packet in _RATIOS and len(node.args) == 1 and not node.kwargs:
            # f(x) / x in one kernel, without dividing (at x = 0 the relevance x * g_in is 0 either way)
            return {src: g * _RATIOS[node.packet](x).to(g.dtype)}
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
        g = damp(g, site.out("x"), self.stabilizer, self.clip, self.norm_scale)
        return exact_vjp(s.program, site.node, s.x, s.batch, g, s.aux_x)


def stacked_sum(program: Any, node: Any) -> bool:
    """``node`` sums a ``torch.stack`` of tensors over the stacked dim (Zennit's ``Sum`` module,
    ``torch.stack(xs, dim=-1).sum(dim=-1)``): a residual sum written with a stack."""
    if node.op != "call" or node.packet != "sum" or not node.args or node.args[0][0] != "n":
        return False
    src = program.nodes[node.args[0][1]]
    if src.op != "call" or src.packet != "stack" or src.shape is None or len(node.args) < 2:
        return False
    sdim = src.args[1][1] if len(src.args) > 1 and src.args[1][0] == "c" else 0
    dims = node.args[1]
    if dims[0] == "c" and isinstance(dims[1], int):
        dims = [dims[1]]
    elif dims[0] in ("l", "t") and all(d[0] == "c" for d in dims[1]):
        dims = [d[1] for d in dims[1]]
    else:
        return False
    nd = len(src.shape)
    return isinstance(sdim, int) and len(dims) == 1 and dims[0] % nd == sdim % nd


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
        from .rules import Gradient  # rules imports this module

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
        if node.packet != "relu":
            raise ValueError(f"rule ReLUBetaSmooth applies to ReLUs only, not {node.describe()}")
        x = site.args("x")[0]
        return {node.args[0][1]: g * torch.sigmoid(self.beta_smooth * x).to(g.dtype)}


# ------------------------------------------------- transformers: products, normalisation, softmax
#
# Products of two activations, normalisation scales and softmax in the relevance form of AttnLRP
# (Achtibat et al. 2024) and CP-LRP (Ali et al. 2022). Each rule below equals gradient x input
# with the corresponding modified gradient (LXT's "efficient" formulation) when epsilon -> 0:
# relevance at a node is its value times the modified gradient there, so a rule that only halves
# or blocks a gradient needs no division (``notes/lrp.md``).

#: products of two tensors: elementwise, or contractions (which need a stabilised ratio)
ELEMENTWISE_PRODUCTS = frozenset(("mul", "div"))
CONTRACTIONS = frozenset(("matmul", "mm", "bmm", "einsum"))
#: ops looked through when asking where an operand comes from (views, broadcasts, copies, casts)
_VIEWS = frozenset(
    """view _unsafe_view reshape expand expand_as transpose t permute unsqueeze squeeze _to_copy to clone contiguous
    alias dropout lift_fresh_copy flatten unflatten repeat repeat_interleave movedim swapaxes""".split()
)
#: shape-preserving ops that are the identity or a copy/cast: an elementwise region passes through them
_SAME = frozenset("_to_copy to clone contiguous alias dropout lift_fresh_copy".split())
#: elementwise arithmetic of one or two tensors
_ARITH = frozenset(("mul", "div", "add", "sub", "rsub", "neg"))
#: operand producers that make it a normalisation scale held constant
_SCALES = frozenset(("rsqrt", "reciprocal"))
#: gating functions (values in [0, 1]): the gate of a product whose operands are both nonlinear
_GATES = frozenset(("sigmoid", "hardsigmoid", "softmax", "_softmax"))
#: elementwise nonlinearities (as ``rules.ELEMENTWISE``; imported lazily there to avoid a cycle)
_NONLINEAR = frozenset(
    """relu leaky_relu elu celu selu gelu silu mish sigmoid tanh softplus hardtanh relu6 hardsigmoid hardswish
    logsigmoid softsign exp log log1p expm1 sqrt rsqrt abs sin cos erf pow square reciprocal clamp clamp_min clamp_max
    threshold prelu""".split()
)


def dependent_operands(node: Any) -> list[tuple[int, int]]:
    """``(argument position, node index)`` of every input-dependent float tensor among the top-level
    arguments (einsum's operand list counts position by position)."""
    deps = {r for r, d in zip(node.refs, node.dep_refs) if d}
    out: list[tuple[int, int]] = []
    for pos, a in enumerate(node.args):
        if isinstance(a, tuple) and a[0] == "n" and a[1] in deps:
            out.append((pos, a[1]))
        elif isinstance(a, tuple) and a[0] in ("l", "t"):
            out += [(pos, e[1]) for e in a[1] if isinstance(e, tuple) and e[0] == "n" and e[1] in deps]
    return out


def producer(program: Any, index: int) -> Any:
    """The node that computed ``index``'s values, looking through views, broadcasts, copies and casts."""
    node = program.nodes[index]
    while node.op == "call" and node.packet in _VIEWS and node.args and node.args[0][0] == "n":
        node = program.nodes[node.args[0][1]]
    return node


def elementwise_source(program: Any, index: int, memo: dict[int, tuple[int, bool]] | None = None) -> tuple[int, bool]:
    """``(s, nonlinear)``: node ``index`` is an elementwise function of the single node ``s`` (the same
    shape), nonlinear when ``nonlinear``; ``(index, False)`` when it is no such function of another node.

    Elementwise functions are built from elementwise nonlinearities, arithmetic with constants,
    casts and copies, and products/quotients/sums of two elementwise functions of the same ``s``
    (a product or quotient of two of them is nonlinear). GPT-2's ``gelu_new``,
    ``0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3)))``, is one: ``s = x``.
    """
    memo = {} if memo is None else memo
    if index in memo:
        return memo[index]
    node = program.nodes[index]
    result = (index, False)
    if node.op == "call" and node.dep and node.shape is not None:
        ops = dependent_operands(node)
        if ops and (node.packet in _NONLINEAR or node.packet in _SAME) and ops[0][0] == 0 and len(ops) == 1:
            s, nonlinear = elementwise_source(program, ops[0][1], memo)
            result = (s, nonlinear or node.packet in _NONLINEAR)
        elif ops and node.packet in _ARITH and all(pos < 2 for pos, _ in ops):
            sources = [elementwise_source(program, i, memo) for _, i in ops]
            same = all(program.nodes[i].shape == node.shape for _, i in ops)
            if same and len({s for s, _ in sources}) == 1:
                product = node.packet in ("mul", "div") and len(ops) == 2
                quotient = node.packet == "div" and any(pos == 1 for pos, _ in ops)
                result = (sources[0][0], any(n for _, n in sources) or product or quotient)
        if program.nodes[result[0]].shape != node.shape:
            result = (index, False)
    memo[index] = result
    return result


def region_source(program: Any, node: Any) -> int | None:
    """The source ``s`` when ``node`` combines elementwise functions of one tensor ``s`` into a
    nonlinear elementwise function of it (an "elementwise region" such as a written-out GELU or
    ``x * sigmoid(x)``), else None. Plain activations (``tanh(x)``) are not regions."""
    if node.packet not in _ARITH:
        return None
    s, nonlinear = elementwise_source(program, node.index)
    return s if nonlinear and s != node.index else None


def _is_nonlinear(program: Any, index: int) -> bool:
    """The operand came (through views and casts) from a nonlinearity: an elementwise activation,
    a softmax, a normalisation scale or an elementwise region."""
    p = producer(program, index)
    if p.op != "call":
        return False
    if p.packet in _NONLINEAR or p.packet in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        return True
    return region_source(program, p) is not None


def scale_operand(program: Any, node: Any) -> int | None:
    """Which of a product's two operands (0 or 1, in argument order) is a scale held constant, or None.

    * ``a / b`` (both input-dependent): the denominator;
    * a product with an operand computed by ``rsqrt``/``reciprocal`` (through views/casts): that
      operand (the normalisation scale of LayerNorm, RMSNorm, GroupNorm);
    * a product with exactly one operand that came from a nonlinearity: that one, the gate
      (``act(g) * u``, the attention weights in ``A @ v``); where both did, the one that came from
      a sigmoid, hard sigmoid or softmax (squeeze-excitation ``silu(h) * sigmoid(fc(pool(h)))``).
    """
    ops = dependent_operands(node)
    if len(ops) != 2 or ops[0][1] == ops[1][1]:
        return None
    if node.packet == "div":
        return 1
    scales = [k for k, (_, i) in enumerate(ops) if producer(program, i).packet in _SCALES]
    if len(scales) == 1:
        return scales[0]
    gates = [k for k, (_, i) in enumerate(ops) if _is_nonlinear(program, i)]
    if len(gates) == 2:  # both went through nonlinearities: the gate is the one squashed to [0, 1]
        gates = [k for k, (_, i) in enumerate(ops) if producer(program, i).packet in _GATES]
    return gates[0] if len(gates) == 1 else None


def normalization(program: Any, node: Any) -> bool:
    """``node`` multiplies an activation by a normalisation scale (``x * rsqrt(var + eps)``) or divides
    it by an input-dependent denominator (``(x - u) / sqrt(s + eps)``)."""
    ops = dependent_operands(node)
    if len(ops) != 2 or ops[0][1] == ops[1][1] or node.packet not in ELEMENTWISE_PRODUCTS:
        return False
    if node.packet == "div":
        return ops[1][0] == 1
    return sum(producer(program, i).packet in _SCALES for _, i in ops) == 1


def _zero_safe(epsilon: float) -> float:
    """The stabiliser for ``epsilon``; 0 means 1e-12, as :class:`Epsilon` (division by an exact zero)."""
    return epsilon if epsilon > 0 else 1e-12


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
            v = v.sum_to_size(s.x[refs[k]].shape)
            put(refs[k], v * shares[k] if shares[k] != 1 else v)
        return res
    g = damp(g, site.out("x"), epsilon)
    pulls = _contraction_pullbacks(node, s.x[refs[0]], s.x[refs[1]], g, want)
    if pulls is None:
        by_ref = exact_vjp(s.program, node, s.x, s.batch, g, s.aux_x)
        if refs[0] == refs[1]:
            return {refs[0]: shares[0] * by_ref[refs[0]]}
        pulls = [by_ref[refs[0]], by_ref[refs[1]]]
    for k in want:
        put(refs[k], pulls[k] * shares[k] if shares[k] != 1 else pulls[k])
    return res


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
        g = damp(g, site.out("x"), self.epsilon)
        pull = s.aux_x.get(node.index)
        if pull is not None:  # the vjp taken with the forward (rewrite.forward)
            grads = pull(g.to(site.out("x").dtype))
            res0: dict[int, Any] = {}
            for pos, ref in wanted:
                v = grads[pos].to(g.dtype) * shares[pos]
                res0[ref] = v if ref not in res0 else res0[ref] + v
            return res0
        # the fused kernels have no double backward and no vmap rule for their backward: where this vjp is
        # differentiated (torch.func.grad, autograd w.r.t. params) or batched (vmap over targets), the same
        # attention written out (_decompose), differentiable at any order
        op: Any = aten_op(node.target)
        if torch.compiler.is_compiling() or any(_transformed(t) for t in (*args[:3], g)):  # (dynamo: written out)
            from ._decompose import scaled_dot_product_attention as op

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return op(q, k, v, *args[3:], **kwargs)

        _, pull = torch.func.vjp(attend, *args[:3])
        grads = pull(g.to(site.out("x").dtype))
        res: dict[int, Any] = {}
        for pos, ref in wanted:
            v = grads[pos].to(g.dtype) * shares[pos]
            res[ref] = v if ref not in res else res[ref] + v
        return res
