r"""Canonizers: pure program-to-program transforms applied before LRP rules are substituted.

``merge_batchnorm`` folds every eval-mode BatchNorm into the adjacent linear layer or
convolution, by graph pattern (not by module class), so torchvision-style VGG, ResNet and
DenseNet blocks and any hand-written model are handled alike:

* *after* a layer (``conv -> bn``, the layer's only user): :math:`W' = W s`,
  :math:`b' = (b - \mu) s + \beta` with :math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}` per
  output channel (Zennit's ``MergeBatchNorm``);
* *before* a layer (``bn -> linear``, or ``bn -> conv`` without padding, the BatchNorm's only
  user): :math:`W' = W \operatorname{diag}(s)` over input channels and
  :math:`b' = b + W t` with :math:`t = \beta - \mu s`.

The merged parameters are new nodes computed from the parameters the model is called with,
so gradients w.r.t. params flow through them; the module and its tensors are untouched.
Residual sums need no canonizer: the LRP policy routes them through the Norm rule.

**Your own canonizers** are functions of the same type, :data:`Canonizer` (``Program -> Program``),
passed as ``ax.lrp(..., canonize=[merge_batchnorm, my_canonizer])`` (also ``conditional`` and
``concepts``). Build the new program with :class:`attrax.rewrite.ProgramBuilder`: ``copy`` the
nodes you keep, insert new ones with ``call`` (arguments encoded as ``("n", index)`` /
``("c", value)``), and ``alias`` a removed node to its replacement; ``tests/test_canonizers.py``
merges a custom affine normalisation layer into the linear layer before it this way. A canonizer must
be pure (the same program in, the same program out): its result is memoised per model fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .rewrite import Node, Program, ProgramBuilder

__all__ = ["Canonizer", "merge_batchnorm"]

#: A graph transform applied before LRP rules are chosen (``canonize=`` of ``ax.lrp``).
Canonizer = Callable[[Program], Program]

_LAYERS = {"conv1d": 3, "conv2d": 4, "conv3d": 5, "linear": 2}


def _is_eval_bn(node: Node) -> bool:
    return node.target == "aten.batch_norm.default" and node.args[5] == ("c", False) and node.dep


def _layer_ok(node: Node) -> bool:
    if node.packet not in _LAYERS or not node.dep or node.kwargs:
        return False
    return not any(d for r, d in zip(node.refs, node.dep_refs) if node.args[0] != ("n", r))  # weights constant


def _groups(node: Node) -> Any:
    return node.args[6] if node.packet.startswith("conv") and len(node.args) > 6 else ("c", 1)


def _padding_zero(node: Node) -> bool:
    if node.packet == "linear":
        return True
    pad = node.args[4] if len(node.args) > 4 else ("c", 0)
    if pad[0] == "c":
        return pad[1] == 0 or pad[1] == "valid"
    return pad[0] in ("l", "t") and all(p == ("c", 0) for p in pad[1])


def merge_batchnorm(program: Program) -> Program:
    """Fold eval-mode BatchNorms into adjacent linear layers/convolutions (see module doc)."""
    users = program.consumers()
    after: dict[int, int] = {}  # layer index -> bn index
    before: dict[int, int] = {}  # layer index -> bn index
    for node in program.nodes:
        if not _is_eval_bn(node):
            continue
        src = program.nodes[node.args[0][1]] if node.args[0][0] == "n" else None
        if src is not None and _layer_ok(src) and users[src.index] == [node.index] and src.index not in after:
            after[src.index] = node.index
            continue
        consumers = users[node.index]
        if len(consumers) == 1:
            layer = program.nodes[consumers[0]]
            if (_layer_ok(layer) and layer.args[0] == ("n", node.index) and _groups(layer) == ("c", 1)
                    and _padding_zero(layer) and layer.index not in after and layer.index not in before
                    and (layer.packet != "linear" or (node.shape is not None and len(node.shape) == 2))):
                before[layer.index] = node.index
    if not after and not before:
        return program
    merged_bn = set(after.values()) | set(before.values())
    b = ProgramBuilder(program)
    # leaves first: a constant (a buffer left out of params) may be traced after the layer it is merged into
    for node in sorted(program.nodes, key=lambda n: n.op == "call"):
        if node.index in merged_bn:
            continue  # aliased when its layer is emitted
        if node.index in after:
            bn = program.nodes[after[node.index]]
            b.alias(bn.index, _emit_after(b, node, bn))
        elif node.index in before:
            bn = program.nodes[before[node.index]]
            _emit_before(b, node, bn)
        else:
            b.copy(node)
    return b.build()


def _bn_scale(b: ProgramBuilder, bn: Node) -> tuple[Any, Any]:
    """Encoded ``(s, t)`` with ``bn(x) = x * s + t`` per channel."""
    _, w, beta, mean, var = bn.args[:5]
    eps = bn.args[7]
    add = b.call("aten.add.Tensor", (b.ref(var[1]), eps), bn, "var_eps")
    s = b.call("aten.rsqrt.default", (("n", add),), bn, "inv_std")
    if w != ("c", None):
        s = b.call("aten.mul.Tensor", (("n", s), b.ref(w[1])), bn, "scale")
    t = b.call("aten.mul.Tensor", (b.ref(mean[1]), ("n", s)), bn, "mean_scaled")
    t = b.call("aten.neg.default", (("n", t),), bn, "shift")
    if beta != ("c", None):
        t = b.call("aten.add.Tensor", (("n", t), b.ref(beta[1])), bn, "shift_beta")
    return ("n", s), ("n", t)


def _weight_bias(layer: Node) -> tuple[Any, Any]:
    weight = layer.args[1]
    bias = layer.args[2] if len(layer.args) > 2 else ("c", None)
    return weight, bias


def _emit_after(b: ProgramBuilder, layer: Node, bn: Node) -> int:
    s, t = _bn_scale(b, bn)
    weight, bias = _weight_bias(layer)
    ndim = _LAYERS[layer.packet]
    s_w = b.call("aten.view.default", (s, ("l", (("c", -1),) + (("c", 1),) * (ndim - 1))), layer, "bn_scale_w")
    w_new = b.call("aten.mul.Tensor", (b.ref(weight[1]), ("n", s_w)), layer, "bn_weight")
    if bias != ("c", None):  # b' = b * s + t
        bb = b.call("aten.mul.Tensor", (b.ref(bias[1]), s), layer, "bn_bias_scaled")
        b_new = b.call("aten.add.Tensor", (("n", bb), t), layer, "bn_bias")
    else:
        b_new = t[1]
    args = (b.ref(layer.args[0][1]), ("n", w_new), ("n", b_new)) + tuple(b._renumber(a) for a in layer.args[3:])
    aliases = layer.aliases + ((bn.module,) if bn.module else ()) + bn.aliases
    return b.copy(layer, args=args, aliases=aliases)


def _emit_before(b: ProgramBuilder, layer: Node, bn: Node) -> int:
    s, t = _bn_scale(b, bn)
    weight, bias = _weight_bias(layer)
    ndim = _LAYERS[layer.packet]
    shape_in = ("l", (("c", 1), ("c", -1)) + (("c", 1),) * (ndim - 2))
    s_in = b.call("aten.view.default", (s, shape_in), layer, "bn_scale_in")
    w_new = b.call("aten.mul.Tensor", (b.ref(weight[1]), ("n", s_in)), layer, "bn_weight")
    t_in = b.call("aten.view.default", (t, shape_in), layer, "bn_shift_in")
    wt = b.call("aten.mul.Tensor", (b.ref(weight[1]), ("n", t_in)), layer, "bn_weight_shift")
    dims = ("l", tuple(("c", d) for d in range(1, ndim)))
    shift = b.call("aten.sum.dim_IntList", (("n", wt), dims), layer, "bn_bias_shift")
    if bias != ("c", None):
        b_new = b.call("aten.add.Tensor", (b.ref(bias[1]), ("n", shift)), layer, "bn_bias")
    else:
        b_new = shift
    x = b.ref(bn.args[0][1])
    args = (x, ("n", w_new), ("n", b_new)) + tuple(b._renumber(a) for a in layer.args[3:])
    return b.copy(layer, args=args)
