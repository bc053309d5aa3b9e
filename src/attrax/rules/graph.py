"""Graph predicates shared by the rule families: which op a node is, where its operands come from.

Plain Python on a traced :class:`~attrax.rewrite.Program`, no tensor work. The DeepLift plan
(:mod:`attrax.deeplift`), LRP's per-kind defaults (:func:`attrax.lrp.node_kind`) and the rules in
:mod:`attrax.rules.deeplift`, :mod:`attrax.rules.lrp` and :mod:`attrax.rules.transformer` read them.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..rewrite import Node, Program, decode, pool_params

__all__ = ["BILINEAR", "CONTRACTIONS", "ELEMENTWISE", "ELEMENTWISE_PRODUCTS", "LINEAR", "MAXPOOL", "PIECEWISE_CONSTANT", "POOLS",
           "REDUCE_MAX", "RELU", "RELU_INSIDE", "SOFTMAX", "WEIGHTED", "dependent_operands", "disjoint_max_pool",
           "elementwise_source", "exclusive_relu_input", "is_elementwise", "is_linear", "is_relu", "n_dep",
           "norm_scale_operand", "normalization", "producer", "reduces_max", "region_source", "scale_operand",
           "selected_by_input", "stacked_sum"]


# ----------------------------------------------------------------- op families


#: ops that are affine in their input-dependent float arguments (given the rest)
LINEAR = frozenset(
    """conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d conv_transpose3d linear addmm mm bmm matmul
    add sub rsub neg mul div batch_norm _native_batch_norm_legit_no_training avg_pool1d avg_pool2d avg_pool3d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d mean sum view _unsafe_view reshape flatten unflatten
    permute transpose t expand expand_as squeeze unsqueeze select slice narrow cat concat concatenate stack split
    split_with_sizes chunk unbind clone contiguous alias dropout feature_dropout alpha_dropout constant_pad_nd pad repeat
    roll flip index_select gather upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_bilinear2d
    upsample_linear1d upsample_trilinear3d _upsample_nearest_exact1d _upsample_nearest_exact2d pixel_shuffle
    pixel_unshuffle _to_copy to lift_fresh_copy cumsum tril triu movedim swapaxes diagonal unfold view_as einsum
    zeros_like ones_like full_like empty_like masked_fill reflection_pad1d reflection_pad2d reflection_pad3d
    replication_pad1d replication_pad2d replication_pad3d _pad_circular repeat_interleave index tensor_split
    index_put type_as""".split()
)


#: ops whose derivative is zero almost everywhere: a gradient through them is silently zero, so even the
#: gradient-based rule methods (guided backprop, deconvnet) refuse them
PIECEWISE_CONSTANT = frozenset(
    "round floor ceil trunc fix sign floor_divide remainder fmod bucketize searchsorted argmax argmin one_hot".split())


#: elementwise nonlinearities y = f(x) (other arguments constant)
ELEMENTWISE = frozenset(
    """relu leaky_relu elu celu selu gelu silu mish sigmoid tanh softplus hardtanh relu6 hardsigmoid hardswish
    logsigmoid softsign exp log log1p expm1 sqrt rsqrt abs sin cos erf pow square reciprocal clamp clip clamp_min clamp_max
    threshold prelu""".split()
)


MAXPOOL = frozenset(("max_pool1d", "max_pool2d", "max_pool3d"))


#: max/min over one dim and adaptive max pooling: tuple-valued (values, indices)
REDUCE_MAX = frozenset(("max", "min", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"))


SOFTMAX = frozenset(("softmax", "_softmax", "log_softmax", "_log_softmax"))


BILINEAR = frozenset(("mul", "div", "mm", "bmm", "matmul", "einsum"))


RELU = frozenset(("relu",))


#: the other spellings of ReLU and the constant arguments that make them one: ``clamp``/``clamp_min`` with min 0
#: and no max, ``threshold(x, 0, 0)`` (``nn.Threshold(0, 0)``)
_RELU_SPELLINGS = {"clamp": ("min", "max"), "clip": ("min", "max"), "clamp_min": ("min",),
                   "threshold": ("threshold", "value"), "hardtanh": ("min_val", "max_val")}


#: fused ops with a ReLU inside (``nn.RNN(nonlinearity="relu")``, ``nn.RNNCell``, the fused add-ReLU): a rule at
#: ReLUs cannot reach it, so the methods that differ from the gradient only there (guided backprop, deconvnet)
#: refuse them rather than give their plain gradient
RELU_INSIDE = frozenset(("rnn_relu", "rnn_relu_cell", "_add_relu"))


def is_relu(node: Node) -> bool:
    """``node`` is ``relu`` of its first argument, whatever the spelling: ``relu`` (module, ``F.relu``, in place),
    ``clamp(x, min=0)``, ``x.clamp_min(0)``, ``F.threshold(x, 0, 0)``, ``F.hardtanh(x, 0, inf)``. The ReLU rules (guided backprop, deconvnet,
    DeepLift's exact ReLU paths, LRP's ``"relu"`` kind) all ask this, so every method agrees on what a ReLU is."""
    if node.packet in RELU:
        return True
    names = _RELU_SPELLINGS.get(node.packet)
    if names is None or not is_elementwise(node):
        return False
    given = dict(zip(names, node.args[1:]))
    given.update((k, v) for k, v in node.kwargs if k in names)
    if node.packet in ("clamp", "clip"):  # no upper bound, or an infinite one
        return _is_zero(given.get("min")) and given.get("max", ("c", None)) in (("c", None), ("c", math.inf))
    if node.packet == "hardtanh":  # (defaults -1, 1)
        top = given.get("max_val")
        return _is_zero(given.get("min_val")) and isinstance(top, tuple) and top[0] == "c" and top[1] == math.inf
    return all(_is_zero(given.get(n)) for n in names)


def _is_zero(arg: Any) -> bool:
    """``arg`` encodes the constant number 0 (a tensor bound, even a zero one, is not read here)."""
    return (isinstance(arg, tuple) and arg[0] == "c" and isinstance(arg[1], (int, float))
            and not isinstance(arg[1], bool) and arg[1] == 0)


def n_dep(node: Node) -> int:
    """Number of argument positions holding an input-dependent float tensor (``x * x`` counts 2)."""
    deps = {r for r, d in zip(node.refs, node.dep_refs) if d}
    count = 0
    for a in node.args:
        if isinstance(a, tuple) and a[0] == "n" and a[1] in deps:
            count += 1
        elif isinstance(a, tuple) and a[0] in ("l", "t"):
            count += sum(1 for e in a[1] if isinstance(e, tuple) and e[0] == "n" and e[1] in deps)
    return count


def selected_by_input(program: Program, node: Node) -> bool:
    """True when a non-float argument (an index or mask) is computed from the input."""
    return any(program.nodes[r].dep and not program.nodes[r].float_out for r in node.refs)


def is_linear(program: Program, node: Node) -> bool:
    """Affine in the input-dependent float arguments at this call site."""
    p = node.packet
    if node.target == "getitem":
        return True
    if node.target == "aten.view.dtype":
        return False  # a reinterpretation of the bits
    if p not in LINEAR or selected_by_input(program, node):
        return False
    args = node.args
    deps = [isinstance(a, tuple) and a[0] == "n" and any(r == a[1] and d for r, d in zip(node.refs, node.dep_refs)) for a in args]
    if p in ("mul", "mm", "bmm", "matmul", "einsum"):
        return n_dep(node) <= 1
    if p == "div":
        if any(k == "rounding_mode" and v != ("c", None) for k, v in node.kwargs):
            return False  # floor/trunc division: piecewise constant, no rule
        return not (len(deps) > 1 and deps[1])
    if p in ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
             "linear"):
        return not any(deps[1:])
    if p == "addmm":
        return not (deps[0] or deps[2]) if len(deps) > 2 else False
    if p == "batch_norm":
        return not _const_arg(node, 5, True)
    if p == "dropout":
        return not _const_arg(node, 2, True)
    return True


def reduces_max(node: Node) -> bool:
    """``node`` is a max/min over one dim (values and indices) or an adaptive max pool of one input tensor."""
    if node.packet not in REDUCE_MAX or n_dep(node) != 1 or not _first_is(node):
        return False
    return node.target.endswith(".dim") or node.packet.startswith("adaptive")


def _const_arg(node: Node, pos: int, value: Any) -> bool:
    return len(node.args) > pos and node.args[pos] == ("c", value)


def is_elementwise(node: Node) -> bool:
    return node.packet in ELEMENTWISE and node.dep_refs[:1] == (True,) and n_dep(node) == 1 and _first_is(node)


def _first_is(node: Node) -> bool:
    a = node.args[0] if node.args else None
    return isinstance(a, tuple) and a[0] == "n" and a[1] == node.refs[0]


def disjoint_max_pool(program: Program, node: Node) -> bool:
    """``node`` is a 2-d/3-d max pool of a node whose windows do not overlap (stride ≥ dilated kernel)."""
    if node.target not in ("aten.max_pool2d.default", "aten.max_pool3d.default") or node.kwargs:
        return False
    src = node.args[0] if node.args else None
    if not (isinstance(src, tuple) and src[0] == "n"):
        return False
    try:
        params = [decode(a, (), None, program.constants) for a in node.args[1:]]
    except (IndexError, TypeError):
        return False
    nd = 2 if node.packet == "max_pool2d" else 3
    k, stride, _, dilation, _ = pool_params([None, *params], nd)
    return all(st >= d * (kk - 1) + 1 for kk, st, d in zip(k, stride, dilation))


def exclusive_relu_input(program: Program, node: Node) -> bool:
    """``node``'s first argument is a ReLU (any spelling) whose output nothing else uses."""
    src = node.args[0] if node.args else None
    if not (isinstance(src, tuple) and src[0] == "n"):
        return False
    relu = program.nodes[src[1]]
    if relu.op != "call" or not is_relu(relu) or not is_elementwise(relu) or program.output == relu.index:
        return False
    return not any(relu.index in n.refs for n in program.nodes if n.index != node.index)


#: ops a normalisation scale may pass through between its rsqrt/sqrt and the product
_SCALE_PASS = frozenset("expand view reshape _unsafe_view unsqueeze _to_copy to alias clone contiguous".split())


def norm_scale_operand(program: Program, node: Node) -> int | None:
    """For ``mul(c, rsqrt(...))`` or ``div(c, sqrt(...))`` of two input-dependent values, the argument
    position of the normalisation scale; else None."""
    if node.packet not in ("mul", "div") or n_dep(node) != 2 or len(node.args) < 2:
        return None
    if any(not (isinstance(a, tuple) and a[0] == "n") for a in node.args[:2]):
        return None
    want = ("sqrt",) if node.packet == "div" else ("rsqrt",)
    positions = (1,) if node.packet == "div" else (1, 0)
    for pos in positions:
        i = node.args[pos][1]
        n = program.nodes[i]
        while n.op == "call" and n.packet in _SCALE_PASS and n.args and n.args[0][0] == "n":
            n = program.nodes[n.args[0][1]]
        if n.op == "call" and n.packet in want:
            return pos
    return None


# ------------------------------------------------------------------ LRP layers


#: ops whose second/third arguments are (weight, bias): dense layers, convolutions and transposed convolutions
WEIGHTED = frozenset(("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                      "conv_transpose3d", "linear"))


#: parameter-free linear layers that the layer rules also act on (implicit positive weights)
POOLS = frozenset(("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                   "adaptive_avg_pool3d"))


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


# ------------------------- products, normalisation scales, elementwise regions


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


#: elementwise nonlinearities (compare ``ELEMENTWISE`` above)
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


#: ops whose output is laid out (B, C, *spatial)
_CHANNEL_FIRST_OPS = frozenset(
    """conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d conv_transpose3d max_pool1d
    max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
    adaptive_max_pool3d batch_norm native_batch_norm _native_batch_norm_legit_no_training instance_norm group_norm
    upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d upsample_bilinear2d upsample_bicubic2d
    upsample_trilinear3d pixel_shuffle pixel_unshuffle""".split()
)
#: module types whose outputs are (B, C, *spatial) whatever ops they trace into (GroupNorm is decomposed)
_CHANNEL_FIRST_MODULES = re.compile(
    r"^torch\.nn\.modules\.\w+\.(Conv\d?d|ConvTranspose\dd|GroupNorm|BatchNorm\dd|InstanceNorm\dd|\w*Pool\dd)$")
#: ops whose output keeps the layout of their same-rank inputs (elementwise, residual adds, cat, pad)
_SAME_LAYOUT_OPS = frozenset(
    """relu relu6 leaky_relu elu selu celu gelu silu mish sigmoid tanh softplus hardtanh hardswish hardsigmoid prelu
    dropout feature_dropout clone contiguous alias detach _to_copy lift_fresh_copy add sub mul div neg abs clamp
    clamp_min clamp_max maximum minimum where pow square sqrt exp log constant_pad_nd pad getitem cat concat""".split()
)


def channel_first(program: Program, node: int) -> bool:
    """Whether ``node``'s value is (B, C, *spatial): it comes from a conv/pool/norm op through ops that keep layout."""
    rank = len(program.nodes[node].shape or ())
    stack, seen = [node], set[int]()
    while stack:
        n = program.nodes[stack.pop()]
        if n.index in seen or n.op != "call":
            continue
        seen.add(n.index)
        if n.packet in _CHANNEL_FIRST_OPS or _CHANNEL_FIRST_MODULES.search(n.module_type or "") is not None:
            return True  # (decomposed normalisation ops keep their module: GroupNorm, LayerNorm2d-style BatchNorm)
        if n.packet in _SAME_LAYOUT_OPS:
            stack.extend(r for r in n.refs if program.nodes[r].dep
                         and (program.nodes[r].shape is None or len(program.nodes[r].shape or ()) == rank))
    return False
