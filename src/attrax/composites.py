r"""Composites: which LRP rule each layer gets, as plain data and functions.

A composite maps a layer to a rule. attrax accepts three forms (API.md section 7):

* any callable ``(name, layer) -> Rule | None``, where ``name`` is the dotted module path
  (or ``"<module>.<node>"`` for operations that are not a module of their own) and ``layer``
  is the module, or a :class:`TracedOp` describing the traced operation;
* a dict from a layer type (class or tuple of classes) or a dotted-name glob to a rule;
* a :class:`Composite` built by :func:`mapping` or one of the factories below, which can
  also match *kinds* of operation (``Kind("conv")`` matches ``nn.Conv2d`` and ``F.conv2d``
  alike) and give the layer nearest the input its own rule.

``None`` from a composite means "the default for this kind of operation": Epsilon(1e-6) for
convolutions and linear layers, Norm for residual sums, average pooling and other
parameter-free linear operations, Pass for activations and unmerged BatchNorm, the exact
gradient for max pooling and reshapes, HoldScale at normalisation scales and products of two
activations (the scale or gate held constant). Matching order: names, then the first layer, then
types and kinds, then the composite's default.

The CNN factories reproduce Zennit's composites of the same names (Anders et al., Zennit,
arXiv:2106.13200), which the tests check number for number; :func:`attn_lrp` and :func:`cp_lrp`
are the transformer composites of AttnLRP and CP-LRP (``notes/lrp.md``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .rules.deeplift import DeconvReLU, Gradient, GuidedReLU
from .rules.lrp import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ReLUBetaSmooth, StackedSumNorm, ZBox, ZPlus
from .rules.transformer import Attention, HoldScale, SoftmaxTaylor, Uniform

__all__ = [
    "Composite",
    "Kind",
    "TracedOp",
    "attn_lrp",
    "beta_smooth",
    "cp_lrp",
    "deconvnet",
    "epsilon",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
    "epsilon_plus",
    "epsilon_plus_flat",
    "excitation_backprop",
    "guided_backprop",
    "mapping",
]


@dataclass(frozen=True)
class Kind:
    """A kind of traced operation, matching modules and functional calls alike.

    Kinds: ``"conv"`` (convolutions, transposed ones too), ``"linear"`` (dense, GPT-2's ``Conv1D``/``addmm``
    too), ``"layer"`` (either), ``"activation"`` (elementwise functions, also written out: a product or
    sum of elementwise functions of one tensor such as GPT-2's ``gelu_new`` or ``x * sigmoid(x)``),
    ``"relu"`` (any spelling: ``F.relu``, ``x.clamp(min=0)``, ``F.threshold(x, 0, 0)``), ``"avgpool"``,
    ``"maxpool"``, ``"add"`` (sums of two activations, e.g. residual connections), ``"batchnorm"``,
    ``"softmax"``, ``"reshape"`` (shape-only ops), ``"arithmetic"`` (other parameter-free linear ops),
    ``"normalize"`` (an activation times a normalisation scale ``rsqrt(var + eps)``, or divided by an input-dependent denominator: inside
    LayerNorm, RMSNorm, GroupNorm), ``"product"`` (other products of two activations: ``q @ k^T``,
    ``attention @ v``, ``act(gate) * up``, squeeze-excitation), ``"attention"``
    (``scaled_dot_product_attention``, kept as one node where a composite has a rule for it), ``"*"`` (anything).
    """

    name: str

    def matches(self, kind: str) -> bool:
        if self.name == "*" or self.name == kind:
            return True
        if self.name == "layer":
            return kind in ("conv", "linear")
        if self.name == "activation":
            return kind in ("activation", "relu")
        return False


@dataclass(frozen=True)
class TracedOp:
    """Describes a traced operation that is not a module call of its own (e.g. ``F.relu``, ``x + y``).

    ``module_type`` is the ``nn`` class the op corresponds to (``nn.ReLU`` for ``F.relu``), so
    type keys such as ``nn.Conv2d`` also match functional calls.
    """

    kind: str
    op: str
    node: str
    module: str | None
    module_type: type | None


def matches_type(key: Any, layer: Any, op_type: type | None = None) -> bool:
    """``key`` (a class or tuple of classes) matches the layer: a module of that type, or an op whose
    ``nn`` counterpart (``op_type``, or a TracedOp's ``module_type``) is one; so ``nn.Linear`` also matches
    the linear op inside GPT-2's ``Conv1D`` module."""
    if isinstance(key, Kind) or not isinstance(key, (type, tuple)):
        return False
    if isinstance(layer, TracedOp):
        return layer.module_type is not None and issubclass(layer.module_type, key)
    return isinstance(layer, key) or (op_type is not None and issubclass(op_type, key))


@dataclass(frozen=True)
class Composite:
    """Rules by name glob, by type or kind, for the first layer, and a default (all optional)."""

    by_name: tuple[tuple[str, Any], ...] = ()
    by_type: tuple[tuple[Any, Any], ...] = ()
    first: tuple[tuple[Any, Any], ...] = ()
    default: Any = None

    def select(self, name: str, layer: Any, kind: str, is_first: bool, op_type: type | None = None) -> Any:
        """The rule for one call site; ``op_type`` is the ``nn`` class of the traced op (``nn.Linear`` for
        the linear op inside a ``Conv1D`` module), matched by type keys as well as the module."""
        for pattern, rule in self.by_name:
            if fnmatch.fnmatchcase(name, pattern):
                return rule
        if is_first:
            for key, rule in self.first:
                if (isinstance(key, Kind) and key.matches(kind)) or matches_type(key, layer, op_type):
                    return rule
        for key, rule in self.by_type:
            if (isinstance(key, Kind) and key.matches(kind)) or matches_type(key, layer, op_type):
                return rule
        return self.default

    def __call__(self, name: str, layer: Any) -> Any:
        kind = layer.kind if isinstance(layer, TracedOp) else module_kind(layer)
        return self.select(name, layer, kind, False)


def module_kind(layer: Any) -> str:
    """The kind of a module, for calling a Composite directly with a module."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "conv"
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.ReLU):
        return "relu"
    if isinstance(layer, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                          nn.AdaptiveAvgPool3d)):
        return "avgpool"
    if isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return "maxpool"
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(layer, (nn.Softmax, nn.LogSoftmax)):
        return "softmax"
    if isinstance(layer, (nn.ELU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh,
                          nn.ReLU6, nn.Mish, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid)):
        return "activation"
    if isinstance(layer, (nn.Flatten, nn.Dropout, nn.Identity)):
        return "reshape"
    return "other"


def mapping(
    by_type: Mapping[Any, Any] | None = None,
    by_name: Mapping[str, Any] | None = None,
    first: Mapping[Any, Any] | None = None,
    default: Any = None,
) -> Composite:
    """Build a composite from plain dicts (Zennit's LayerMap, NameMap and SpecialFirstLayerMap).

    Args:
        by_type: ``{nn.Conv2d: ZPlus(), (nn.Linear,): Epsilon(), Kind("add"): Norm()}``.
        by_name: ``{"features.0": Flat(), "classifier.*": Epsilon(0.25)}`` (``fnmatch`` globs).
        first: rules for the linear/conv layer nearest the input, keyed like ``by_type``.
        default: rule for anything unmatched (``None``: the per-kind default).

    Example:
        >>> import torch, attrax as ax
        >>> comp = ax.composites.mapping(by_type={torch.nn.Conv2d: ax.rules.ZPlus()}, first={ax.composites.Kind("layer"): ax.rules.Flat()})
        >>> comp("features.3", torch.nn.Conv2d(3, 3, 3))
        ZPlus(stabilizer=1e-06, zero_params=())
    """
    return Composite(
        by_name=tuple((by_name or {}).items()),
        by_type=tuple((by_type or {}).items()),
        first=tuple((first or {}).items()),
        default=default,
    )


def as_composite(composite: Any) -> Callable[..., Any] | Composite | None:
    """Normalise the ``composite`` argument of ``ax.lrp``."""
    if composite is None or isinstance(composite, Composite):
        return composite
    if isinstance(composite, Mapping):
        by_name, by_type = {}, {}
        for key, rule in composite.items():
            if isinstance(key, str):
                by_name[key] = rule
            elif isinstance(key, (type, tuple, Kind)):
                by_type[key] = rule
            else:
                raise TypeError(f"composite dict keys must be layer types, Kind(...) or name globs, got {key!r}")
        return mapping(by_type=by_type, by_name=by_name)
    if callable(composite):
        return composite
    raise TypeError(
        f"composite must be None, an ax.composites factory result, a dict or a callable (name, layer) -> Rule, "
        f"got {type(composite).__name__}"
    )


def _base(stabilizer: float) -> dict[Any, Any]:
    """Zennit's ``layer_map_base``: activations pass, sums and average pools normalise, BatchNorm passes;
    and (attrax) normalisation scales and gates held constant (LayerNorm, squeeze-excitation, gated units)."""
    return {Kind("activation"): Pass(), Kind("add"): Norm(stabilizer), Kind("avgpool"): Norm(stabilizer),
            Kind("batchnorm"): Pass(), Kind("normalize"): HoldScale(stabilizer), Kind("product"): HoldScale(stabilizer)}


def epsilon(epsilon: float = 1e-6) -> Composite:
    """Epsilon everywhere (the meaning of ``composite=None``)."""
    return mapping(by_type={**_base(1e-6), Kind("layer"): Epsilon(epsilon)})


def epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6, zero_params: tuple[str, ...] = ()) -> Composite:
    """z⁺ on convolutions, ε on dense layers (Zennit ``EpsilonPlus``)."""
    return mapping(by_type={**_base(stabilizer), Kind("conv"): ZPlus(stabilizer, zero_params),
                            Kind("linear"): Epsilon(epsilon, zero_params)})


def epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, zero_params: tuple[str, ...] = ()) -> Composite:
    """Flat on the first layer, z⁺ on convolutions, ε on dense layers (Zennit ``EpsilonPlusFlat``)."""
    return mapping(
        by_type={**_base(stabilizer), Kind("conv"): ZPlus(stabilizer, zero_params), Kind("linear"): Epsilon(epsilon, zero_params)},
        first={Kind("layer"): Flat(stabilizer, zero_params)},
    )


def epsilon_gamma_box(
    low: Any = -3.0,
    high: Any = 3.0,
    gamma: float = 0.25,
    epsilon: float = 1e-6,
    stabilizer: float = 1e-6,
    zero_params: tuple[str, ...] = (),
) -> Composite:
    """z^B on the first convolution, γ on other convolutions, ε on dense layers (Zennit ``EpsilonGammaBox``)."""
    return mapping(
        by_type={**_base(stabilizer), Kind("conv"): Gamma(gamma, stabilizer, zero_params),
                 Kind("linear"): Epsilon(epsilon, zero_params)},
        first={Kind("conv"): ZBox(low, high, stabilizer, zero_params)},
    )


def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6, zero_params: tuple[str, ...] = ()) -> Composite:
    """α2β1 on convolutions, ε on dense layers (Zennit ``EpsilonAlpha2Beta1``)."""
    return mapping(by_type={**_base(stabilizer), Kind("conv"): AlphaBeta(2.0, 1.0, stabilizer, zero_params),
                            Kind("linear"): Epsilon(epsilon, zero_params)})


def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, zero_params: tuple[str, ...] = ()) -> Composite:
    """Flat on the first layer, α2β1 on convolutions, ε on dense layers (Zennit ``EpsilonAlpha2Beta1Flat``)."""
    return mapping(
        by_type={**_base(stabilizer), Kind("conv"): AlphaBeta(2.0, 1.0, stabilizer, zero_params),
                 Kind("linear"): Epsilon(epsilon, zero_params)},
        first={Kind("layer"): Flat(stabilizer, zero_params)},
    )


def guided_backprop() -> Composite:
    """Guided backprop at ReLUs and the exact gradient elsewhere (Zennit ``GuidedBackprop``).

    With ``ax.lrp``'s relevance convention the result is the target score times guided backprop.
    """
    return mapping(by_type={Kind("relu"): GuidedReLU()}, default=Gradient())


def deconvnet() -> Composite:
    """Deconvnet at ReLUs and the exact gradient elsewhere (Zennit ``DeconvNet``)."""
    return mapping(by_type={Kind("relu"): DeconvReLU()}, default=Gradient())


def excitation_backprop(stabilizer: float = 1e-6, zero_params: tuple[str, ...] = ()) -> Composite:
    """Excitation backprop [Zhang et al. 2016]: z⁺ on every layer, Norm on sums and average
    pools, the gradient elsewhere (Zennit ``ExcitationBackprop``). A sum written as Zennit's ``Sum``
    module, ``torch.stack(xs, -1).sum(-1)``, gets Norm too (:class:`~attrax.rules.StackedSumNorm`)."""
    return mapping(by_type={Kind("layer"): ZPlus(stabilizer, zero_params), Kind("add"): Norm(stabilizer),
                            Kind("avgpool"): Norm(stabilizer), Kind("arithmetic"): StackedSumNorm(stabilizer)},
                   default=Gradient())


def beta_smooth(beta_smooth: float = 10.0) -> Composite:
    """Every ReLU's gradient replaced by softplus's, ``sigmoid(beta_smooth * x)``, the exact gradient
    elsewhere (Zennit ``BetaSmooth``; :class:`~attrax.rules.ReLUBetaSmooth`). As for
    :func:`guided_backprop`, ``ax.lrp``'s result is the target score times this modified gradient."""
    return mapping(by_type={Kind("relu"): ReLUBetaSmooth(beta_smooth)}, default=Gradient())



def _transformer(epsilon: float, product: Any, attention: Any) -> dict[Any, Any]:
    """The rule table shared by AttnLRP and CP-LRP; ``epsilon`` is the only stabiliser in it."""
    # parameter-free ops of one activation (scaling, constant masks, casts, rotary products with constants) are
    # LRP-0: relevance passes them whole (a constant offset keeps its share); in gradient form their plain vjp
    return {Kind("layer"): Epsilon(epsilon), Kind("add"): Norm(epsilon), Kind("arithmetic"): Norm(0.0),
            Kind("avgpool"): Norm(epsilon), Kind("activation"): Pass(), Kind("batchnorm"): Pass(),
            Kind("softmax"): SoftmaxTaylor(epsilon), Kind("normalize"): HoldScale(epsilon), Kind("product"): product,
            Kind("attention"): attention}


def attn_lrp(epsilon: float = 1e-6) -> Composite:
    r"""AttnLRP [1]: LRP for transformers with attention-aware rules.

    * ε on linear layers and convolutions (GPT-2's ``Conv1D`` included), Norm(ε) on residual sums and
      average pooling; other parameter-free linear ops of one activation (scaling, masks, means, casts,
      products with constants such as rotary embeddings) by LRP-0 (``Norm(0)``: relevance passes whole,
      a constant offset keeps its share), which is what ε → 0 gives and needs no stabiliser in gradient form;
    * the identity rule (:class:`~attrax.rules.Pass`) on elementwise nonlinearities, also when
      written out (GPT-2's ``gelu_new``: one region, relevance straight to its input);
    * the uniform rule (:class:`~attrax.rules.Uniform`, [1] Eq. 7) on products of two
      activations: ``q @ k^T``, ``attention @ v``, ``act(gate) * up``;
    * softmax by its Taylor rule :math:`R_x = x \odot (R - s \sum R)`
      (:class:`~attrax.rules.SoftmaxTaylor`, [1] Prop. 3.1);
    * normalisation (LayerNorm, RMSNorm, GroupNorm, ``(x - u) / sqrt(s + eps)``) by the identity rule
      with the scale held constant (:class:`~attrax.rules.HoldScale`): the centring is linear (Norm),
      the scale gets no relevance.

    ``epsilon`` is the only stabiliser (ε → 0 is gradient x input with the modified gradients, LXT's
    "efficient" mode). The relevance of an embedding model is at its input: pass the embedding output
    as ``x`` (``ax.functionalize(lm, embedding=...)``).

    References:
        [1] Achtibat et al. AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
            Transformers. ICML 2024. arXiv:2402.05602.
    """
    return mapping(by_type=_transformer(epsilon, Uniform(epsilon), Attention(0.25, 0.25, 0.5, epsilon)))


def cp_lrp(epsilon: float = 1e-6) -> Composite:
    r"""CP-LRP [1]: attention weights, normalisation scales and gates held constant.

    As :func:`attn_lrp`, except at products of two activations
    (:class:`~attrax.rules.HoldScale`): relevance through ``attention @ v`` goes to ``v`` alone
    (none through ``q``, ``k`` or the softmax), and in a gated unit ``act(g) * u`` to ``u`` (the
    operand that went through the nonlinearity is the gate). Products with no such operand split
    uniformly. LXT 2.1's ``cp_LRP`` patches do the same (``stop_gradient`` on query, key and gate).

    References:
        [1] Ali et al. XAI for Transformers: Better Explanations through Conservative Propagation.
            ICML 2022. arXiv:2202.07304.
    """
    return mapping(by_type=_transformer(epsilon, HoldScale(epsilon), Attention(0.0, 0.0, 1.0, epsilon)))
