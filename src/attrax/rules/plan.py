"""The rule interface and the reverse pass that runs a plan of rules.

A plan is a tuple with one rule (or None) per node of a program; :func:`run_plan` calls each
node's rule in the reverse pass. Under ``torch.compile`` built-in rules are dispatched through
:data:`RULE_CLASSES`, which therefore lists every built-in rule class of every family.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..rewrite import Node, Program, Site, Streams, reverse
from .deeplift import (Bilinear, CrossMax, DeconvReLU, DisjointCrossMax, Gradient, GuidedReLU, NormScale, ReduceCrossMax,
                       ReluMaxPool, Rescale, SoftmaxRescale)
from .lrp import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, WSquare, ZBox, ZPlus
from .transformer import HoldScale, SoftmaxTaylor, Uniform

__all__ = ["RULE_CLASSES", "Rule", "apply_rule", "run_plan"]


class Rule(Protocol):
    def backward(self, site: Site, g: Any) -> dict[int, Any]: ...


#: Built-in rule classes. Under torch.compile rules are dispatched through this tuple: a plan made at
#: trace time holds rule objects that dynamo cannot guard on, and ``Class.backward(rule, ...)``
#: through a module-level class is what it can trace. (Subclasses are dispatched to their base class there.)
RULE_CLASSES = (Gradient, Rescale, CrossMax, DisjointCrossMax, ReluMaxPool, SoftmaxRescale, Bilinear, GuidedReLU,
                DeconvReLU, ReduceCrossMax, NormScale, Epsilon, Gamma, ZPlus, AlphaBeta, Flat, WSquare, ZBox, Pass, Norm, Uniform,
                HoldScale, SoftmaxTaylor)


def apply_rule(rule: Any, site: Site, g: Any) -> dict[int, Any]:
    if not torch.compiler.is_compiling():
        return rule.backward(site, g)
    for cls in RULE_CLASSES:  # isinstance is what dynamo can evaluate on an unguarded constant
        if isinstance(rule, cls):
            return cls.backward(rule, site, g)
    return rule.backward(site, g)  # a user-defined rule


def run_plan(
    program: Program,
    plan: Any,
    streams: Streams,
    seeds: dict[int, Any],
    arrive: Any = None,
    captured: dict[int, Any] | None = None,
    leave: Any = None,
) -> dict[int, Any]:
    """Reverse pass with the substituted rules; returns ``{input position: cotangent}``.

    ``arrive``/``captured`` as in :func:`attrax.rewrite.reverse`; ``leave(node, grads)`` may edit
    the cotangents a node sends to its inputs (conditional attribution drops parallel paths there).
    """

    def backward(node: Node, g: Any) -> dict[int, Any]:
        rule = plan[node.index]
        out = {} if rule is None else apply_rule(rule, Site(node, streams), g)
        return out if leave is None else leave(node, out)

    return reverse(program, seeds, backward, arrive, captured)
