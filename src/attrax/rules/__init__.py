r"""Backward rules: small, stateless data that the rewrite pass substitutes at call sites.

``ax.rules`` is the one public place for all built-in rules; each family lives in its own module:

* :mod:`attrax.rules.deeplift`: the exact gradient, DeepLift's rescale family, guided backprop and
  deconvnet (``Gradient``, ``Rescale``, ``CrossMax``, ``SoftmaxRescale``, ``Bilinear``, ...);
* :mod:`attrax.rules.lrp`: LRP's layer rules (``Epsilon``, ``Gamma``, ``ZPlus``, ``AlphaBeta``,
  ``Flat``, ``WSquare``, ``ZBox``) and ``Pass``, ``Norm``, ``StackedSumNorm``, ``ReLUBetaSmooth``;
* :mod:`attrax.rules.transformer`: products, normalisation, softmax and attention
  (``Uniform``, ``HoldScale``, ``SoftmaxTaylor``, ``Attention``);
* :mod:`attrax.rules.graph`: the graph predicates the families share;
* :mod:`attrax.rules.plan`: the ``Rule`` interface, ``RULE_CLASSES`` and ``run_plan``.

A rule is a frozen dataclass with one method, ``backward(site, g)``, mapping the cotangent ``g``
arriving at a node's output to cotangents for the node's input-dependent arguments, in ordinary
differentiable tensor ops (``notes/rewrite.md``).
"""

from __future__ import annotations

from ..rewrite import Site, call_args
from .deeplift import (Bilinear, CrossMax, DeconvReLU, DisjointCrossMax, Gradient, GuidedReLU, NormScale, ReduceCrossMax,
                       ReluMaxPool, Rescale, SoftmaxRescale)
from .graph import (BILINEAR, ELEMENTWISE, LINEAR, MAXPOOL, REDUCE_MAX, RELU, SOFTMAX, is_elementwise, is_linear, is_relu,
                    norm_scale_operand, reduces_max, selected_by_input)
from .lrp import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ReLUBetaSmooth, StackedSumNorm, WSquare, ZBox, ZPlus, stabilize
from .plan import Rule, run_plan
from .transformer import Attention, HoldScale, SoftmaxTaylor, Uniform

__all__ = [
    "Bilinear",
    "CrossMax",
    "DeconvReLU",
    "DisjointCrossMax",
    "Gradient",
    "GuidedReLU",
    "ReluMaxPool",
    "Rescale",
    "Rule",
    "SoftmaxRescale",
]
__all__ += ["BILINEAR", "ELEMENTWISE", "LINEAR", "MAXPOOL", "REDUCE_MAX", "ReduceCrossMax", "reduces_max", "NormScale",
            "norm_scale_operand", "RELU", "SOFTMAX", "Site", "call_args", "is_elementwise",
            "is_linear", "is_relu", "selected_by_input"]
__all__ += ["AlphaBeta", "Attention", "Epsilon", "Flat", "Gamma", "HoldScale", "Norm", "Pass", "ReLUBetaSmooth", "SoftmaxTaylor",
            "StackedSumNorm", "Uniform", "WSquare", "ZBox", "ZPlus", "stabilize", "run_plan"]
