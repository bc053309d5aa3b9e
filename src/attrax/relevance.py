r"""LRP rules: frozen dataclasses parameterising one generic relevance backward.

For a layer :math:`z = W a + b` (linear, convolution, average pooling) a rule is a
list of *parts*, each a pair (input modifier, parameter modifier) giving
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .rewrite import Site, aten_op, exact_vjp

__all__ = ["AlphaBeta", "Epsilon", "Flat", "Gamma", "Norm", "Pass", "WSquare", "ZBox", "ZPlus", "stabilize"]

#: ops whose second/third arguments are (weight, bias)
WEIGHTED = frozenset(("conv1d", "conv2d", "conv3d", "convolution", "linear"))
#: parameter-free linear layers that the layer rules also act on (implicit positive weights)
POOLS = frozenset(("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                   "adaptive_avg_pool3d"))


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) = 1`` (Zennit's stabiliser)."""
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


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


def _layer(site: Site) -> tuple[Callable[..., Tensor], Tensor, Tensor | None, Tensor | None]:
    """``(call(a, W, b), a, W, b)`` for the layer at ``site``; W and b are None for pools."""
    node, s = site.node, site.streams
    args, kwargs = s.args(node)
    if node.packet in WEIGHTED:
        weight = args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        op = aten_op(node.target)

        def call(a: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
            full = [a, w, b, *args[3:]] if len(args) > 2 else [a, w, b]
            return op(*full, **{k: v for k, v in kwargs.items() if k != "bias"})

        return call, args[0], weight, bias
    if node.packet in POOLS:
        op = aten_op(node.target)

        def pool(a: Tensor, w: Any, b: Any) -> Tensor:
            return op(a, *args[1:], **kwargs)

        return pool, args[0], None, None
    raise ValueError(f"LRP layer rules act on convolutions, linear and average-pooling layers, not {node.describe()}")


def _parts(site: Site, parts: Sequence[_Part], rule: Any, zero_params: tuple[str, ...]) -> list[tuple[Tensor, Tensor, Any]]:
    """``(a_k, z_k, pullback_k)`` for each part; pullback maps ``d z_k`` to ``W_k^T d z_k``."""
    call, a, weight, bias = _layer(site)
    out: list[tuple[Tensor, Tensor, Any]] = []
    for part in parts:
        a_k = _input(part.input, a, rule)
        if weight is None:  # pooling: implicit weights 1/k >= 0
            scale = {"id": 1.0, "pos": 1.0, "gamma_pos": 1.0 + part.gamma, "neg": 0.0, "gamma_neg": 1.0}.get(part.param)
            if scale is None:
                raise ValueError(f"rule {rule} modifies weights in a way undefined for {site.node.describe()}")
            z_k, pull = torch.func.vjp(lambda t: call(t, None, None) * scale, a_k)
            out.append((a_k, z_k, pull))
            continue
        w_k = torch.zeros_like(weight) if "weight" in zero_params else _param(part.param, weight, part.gamma)
        b_k = None if (part.zero_bias or "bias" in zero_params) else _param(part.param, bias, part.gamma)
        if part.input == "id" and part.param == "id" and not part.zero_bias and not zero_params:
            out.append((a_k, site.out("x"), _exact_pullback(site)))  # the forward already computed z
            continue
        z_k, pull = torch.func.vjp(lambda t, w=w_k, b=b_k: call(t, w, b), a_k)
        out.append((a_k, z_k, pull))
    return out


def _exact_pullback(site: Site) -> Callable[[Tensor], tuple[Tensor]]:
    s, node = site.streams, site.node
    ref = node.args[0][1]

    def pull(g: Tensor) -> tuple[Tensor]:
        return (exact_vjp(s.program, node, s.x, s.batch, g, s.aux_x)[ref],)

    return pull


def _result(site: Site, relevance: Tensor) -> dict[int, Any]:
    return {site.node.args[0][1]: relevance}


# ----------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Epsilon:
    r"""LRP-ε [Bach et al. 2015]: :math:`R_i = a_i \sum_j w_{ij} R_j / (z_j + \epsilon\,\mathrm{sign}(z_j))`.

    ``epsilon=0`` is LRP-0 (with a zero-safe stabiliser of 1e-12 only where z is exactly 0).
    """

    epsilon: float = 1e-6
    zero_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        ((a, z, pull),) = _parts(site, [_Part("id", "id")], self, self.zero_params)
        eps = self.epsilon if self.epsilon > 0 else 1e-12
        return _result(site, a * pull(r / stabilize(z, eps))[0])


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
        (a1, z1, p1), (a2, z2, p2), (a3, z3, p3), (a4, z4, p4) = _parts(site, parts, self, self.zero_params)
        z = site.out("x")
        pos = r * (z > 0).to(r.dtype) / stabilize(z1 + z2, self.stabilizer)
        neg = r * (z < 0).to(r.dtype) / stabilize(z3 + z4, self.stabilizer)
        rel = a1 * p1(pos)[0] + a2 * p2(pos)[0] + a3 * p3(neg)[0] + a4 * p4(neg)[0]
        return _result(site, rel)


@dataclass(frozen=True)
class ZPlus:
    r"""LRP-z⁺ [Montavon et al. 2017] in its sign-aware form (α=1, β=0):
    :math:`R_i = \sum_j (a_i^+ w_{ij}^+ + a_i^- w_{ij}^-) R_j / \sum_i (a_i^+ w_{ij}^+ + a_i^- w_{ij}^-)`."""

    stabilizer: float = 1e-6
    zero_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        (a1, z1, p1), (a2, z2, p2) = _parts(site, [_Part("pos", "pos"), _Part("neg", "neg", zero_bias=True)], self,
                                            self.zero_params)
        s = r / stabilize(z1 + z2, self.stabilizer)
        return _result(site, a1 * p1(s)[0] + a2 * p2(s)[0])


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
        (a1, z1, p1), (a2, z2, p2), (a3, z3, p3), (a4, z4, p4) = _parts(site, parts, self, self.zero_params)
        s_pos = r / stabilize(z1 + z2, self.stabilizer)
        s_neg = r / stabilize(z3 + z4, self.stabilizer)
        rel = self.alpha * (a1 * p1(s_pos)[0] + a2 * p2(s_pos)[0]) - self.beta * (a3 * p3(s_neg)[0] + a4 * p4(s_neg)[0])
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
        ((_, z, pull),) = _parts(site, [_Part("ones", "ones", zero_bias=True)], self, self.zero_params)
        return _result(site, pull(r / stabilize(z, self.stabilizer))[0])


@dataclass(frozen=True)
class WSquare:
    """LRP-w² [Montavon et al. 2017]: relevance in proportion to squared weights (inputs ignored)."""

    stabilizer: float = 1e-6
    zero_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        ((_, z, pull),) = _parts(site, [_Part("ones", "square")], self, self.zero_params)
        return _result(site, pull(r / stabilize(z, self.stabilizer))[0])


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
        (a1, z1, p1), (a2, z2, p2), (a3, z3, p3) = _parts(site, parts, self, self.zero_params)
        s = r / stabilize(z1 - z2 - z3, self.stabilizer)
        return _result(site, a1 * p1(s)[0] - a2 * p2(s)[0] - a3 * p3(s)[0])


@dataclass(frozen=True)
class Pass:
    """Relevance passes through unchanged (for elementwise operations such as activations)."""

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        node = site.node
        x = site.args("x")[0]
        if x.shape != r.shape:
            raise ValueError(f"Pass applies to shape-preserving ops only, not {node.describe()}")
        return _result(site, r)


@dataclass(frozen=True)
class Norm:
    r"""Relevance in proportion to each input's contribution, for parameter-free linear
    operations (residual sums, average pooling, means, scaling):
    :math:`R_{in,k} = a_k \odot J_k^\top (R / \mathrm{stab}(\mathrm{out}))`."""

    stabilizer: float = 1e-6

    def backward(self, site: Site, r: Tensor) -> dict[int, Any]:
        s, node = site.streams, site.node
        ratio = r / stabilize(site.out("x"), self.stabilizer)
        grads = exact_vjp(s.program, node, s.x, s.batch, ratio, s.aux_x)
        return {ref: s.x[ref] * g for ref, g in grads.items()}
