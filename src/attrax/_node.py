"""The traced program's node type and the helpers on its encoded arguments.

Shared by the rewrite pass (:mod:`attrax.rewrite`, which builds and runs programs of these nodes)
and the explicit transposes (:mod:`attrax._transpose`), so neither imports the other's internals
and the dependency runs one way: ``rewrite`` -> ``_transpose`` -> ``_node``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Node"]


@dataclass(frozen=True)
class Node:
    """One operation of a traced model.

    ``op`` is ``"param"``, ``"input"``, ``"const"`` or ``"call"``. For calls,
    ``target`` is the ATen overload name (``"aten.conv2d.default"``) or
    ``"getitem"``; ``args``/``kwargs`` are encoded (see ``_encode``); ``refs`` are
    the node indices the arguments reference, ``dep_refs`` which of them depend
    on the model input and are floating point (they receive cotangents), and
    ``dep`` whether this node's value depends on the input at all.
    """

    index: int
    op: str
    target: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    name: str = ""
    module: str | None = None
    module_type: str | None = None
    layer: str | None = None
    dep: bool = False
    refs: tuple[int, ...] = ()
    dep_refs: tuple[bool, ...] = ()
    float_out: bool = True
    shape: tuple[int, ...] | None = None
    packet: str = ""  # "conv2d" for "aten.conv2d.default" (a field, not a property: dynamo hashes it)
    nonneg: bool = False  # the value is >= 0 by construction (after ReLU, pooling of such, ...)
    aliases: tuple[str, ...] = ()  # other module paths whose output this node is (a BatchNorm folded into it)
    stack: tuple[tuple[str, str], ...] = ()  # enclosing module calls, outermost first: (call key, module path)

    def __post_init__(self) -> None:
        if not self.packet:
            object.__setattr__(self, "packet", self.target.split(".")[1] if self.target.startswith("aten.") else self.target)

    def describe(self) -> str:
        where = f" in module '{self.module}' ({self.module_type})" if self.module else ""
        return f"{self.target} at node '{self.name}'{where}"


def _refs(encoded: tuple[Any, ...]) -> tuple[int, ...]:
    out: list[int] = []

    def walk(e: Any) -> None:
        tag = e[0]
        if tag == "n":
            out.append(e[1])
        elif tag in ("l", "t"):
            for v in e[1]:
                walk(v)

    for e in encoded:
        walk(e)
    return tuple(out)


def _ntuple(v: Any, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v
