"""LRP rules, kept importable here: they live in :mod:`attrax.rules.lrp` and :mod:`attrax.rules.transformer`."""

from __future__ import annotations

from .rules.graph import stacked_sum
from .rules.lrp import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ReLUBetaSmooth, StackedSumNorm, WSquare, ZBox, ZPlus, stabilize
from .rules.transformer import Attention, HoldScale, SoftmaxTaylor, Uniform

__all__ = ["AlphaBeta", "Attention", "Epsilon", "Flat", "Gamma", "HoldScale", "Norm", "Pass", "ReLUBetaSmooth", "SoftmaxTaylor",
           "StackedSumNorm", "Uniform", "WSquare", "ZBox", "ZPlus", "stabilize", "stacked_sum"]
