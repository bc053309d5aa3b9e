r"""Layer-wise relevance propagation on the rewrite engine.

``ax.lrp`` traces the model, canonizes the graph (BatchNorm folded into adjacent layers), asks
the composite for a rule at every call site, evaluates the model once and propagates relevance
from the selected output back to the input. The relevance entering the network is the selected
output value (for a callable target ``g``, ``out * dg/dout``), so with conservative rules and zero
biases the attributions of a sample sum to its target score (API.md sections 2 and 3). Functional
ops, reused modules and in-place activations are separate call sites like any other, and the
user's module is never touched.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._types import ModelFn, Params, Target, TensorOrTuple
from .canonizers import merge_batchnorm
from .composites import Composite, Kind, TracedOp, as_composite
from .core import FunctionalModel, eager_no_grad, forward_args, publish_output, refuse_bound_in_compiled_code
from .deeplift import seed
from .rewrite import (Node, Program, Site, Streams, dense_layers, consumable, forward, fuse_elementwise, memoised,
                      per_program, plain_eager, program_spec, reverse, select_before_linear, select_pushdown, substitute,
                      trace_program)
from .rules.deeplift import DeconvReLU, Gradient, GuidedReLU
from .rules.graph import (CONTRACTIONS, ELEMENTWISE_PRODUCTS, MAXPOOL, POOLS, SOFTMAX, WEIGHTED, dependent_operands,
                          is_elementwise, is_linear, is_relu, n_dep, normalization, reduces_max, region_source,
                          scale_operand)
from .rules.lrp import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ReLUBetaSmooth, StackedSumNorm, WSquare, ZBox, ZPlus
from .rules.plan import run_plan
from .rules.transformer import Attention, HoldScale, SoftmaxTaylor, Uniform
from .targets import ResolvedTarget, prepare_call, select

__all__ = ["apply_scale", "gradient_form", "initial_relevance", "lrp", "node_kind", "seeded_by_score"]

RESHAPE = frozenset(
    """view _unsafe_view reshape flatten unflatten permute transpose t squeeze unsqueeze select slice narrow cat concat
    concatenate stack split split_with_sizes chunk unbind clone contiguous alias dropout feature_dropout alpha_dropout
    _to_copy to lift_fresh_copy roll flip expand repeat constant_pad_nd index_select gather pixel_shuffle
    pixel_unshuffle movedim swapaxes tensor_split repeat_interleave index type_as""".split()
)
BATCHNORM = frozenset(("batch_norm", "_native_batch_norm_legit_no_training"))
LAYER_RULES = (Epsilon, Gamma, ZPlus, AlphaBeta, Flat, WSquare, ZBox)

_DEFAULTS: dict[str, Any] = {
    "conv": Epsilon(1e-6),
    "linear": Epsilon(1e-6),
    "avgpool": Norm(1e-6),
    "maxpool": Gradient(),
    "relu": Pass(),
    "activation": Pass(),
    "softmax": Pass(),
    "batchnorm": Pass(),
    "add": Norm(1e-6),
    "reshape": Gradient(),
    "arithmetic": Norm(1e-6),
    "product": HoldScale(1e-6),
    "normalize": HoldScale(1e-6),
}

_OP_TYPES: dict[str, type] = {
    "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d, "conv_transpose1d": nn.ConvTranspose1d,
    "conv_transpose2d": nn.ConvTranspose2d, "conv_transpose3d": nn.ConvTranspose3d, "linear": nn.Linear, "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh, "softplus": nn.Softplus, "avg_pool1d": nn.AvgPool1d, "avg_pool2d": nn.AvgPool2d,
    "avg_pool3d": nn.AvgPool3d, "adaptive_avg_pool1d": nn.AdaptiveAvgPool1d,
    "adaptive_avg_pool2d": nn.AdaptiveAvgPool2d, "adaptive_avg_pool3d": nn.AdaptiveAvgPool3d,
    "max_pool1d": nn.MaxPool1d, "max_pool2d": nn.MaxPool2d, "max_pool3d": nn.MaxPool3d,
    "batch_norm": nn.modules.batchnorm._BatchNorm, "softmax": nn.Softmax, "_softmax": nn.Softmax,
    "flatten": nn.Flatten, "dropout": nn.Dropout,
}


def node_kind(program: Program, node: Node) -> str:
    """The kind of a call site, as used by ``Kind`` keys and the per-kind defaults."""
    p = node.packet
    if p in WEIGHTED and _weights_constant(node):
        return "conv" if p.startswith("conv") else "linear"
    if p in POOLS:
        return "avgpool"
    if p in MAXPOOL or reduces_max(node):
        return "maxpool"
    if is_relu(node):  # any spelling (clamp(x, min=0), F.threshold(x, 0, 0)): Kind("relu") and nn.ReLU match them all
        return "relu"
    if is_elementwise(node):
        return "activation"
    if p in SOFTMAX:
        return "softmax"
    if p == "scaled_dot_product_attention":
        return "attention"
    if p in BATCHNORM:
        return "batchnorm"
    if p in ("add", "sub") and n_dep(node) == 2:
        return "activation" if region_source(program, node) is not None else "add"
    if p in RESHAPE or node.target == "getitem" or _zeroing(node):
        return "reshape"
    if is_linear(program, node):
        return "arithmetic"
    if p in ELEMENTWISE_PRODUCTS or p in CONTRACTIONS:
        # an elementwise function of one tensor (x * sigmoid(x), 1 / x), a normalisation scale, or a
        # product of two activations (q @ k^T, attention @ v, act(gate) * up)
        if p in ELEMENTWISE_PRODUCTS and region_source(program, node) is not None:
            return "activation"
        if n_dep(node) == 2:
            return "normalize" if normalization(program, node) else "product"
    return "other"


def _zeroing(node: Node) -> bool:
    """``masked_fill(x, mask, 0)`` with a constant mask: a selection of entries (as zero padding is), so the
    per-kind default is the exact gradient, not ε (the written-out attention zeroes fully masked query rows so)."""
    if node.packet != "masked_fill" or len(node.args) < 3:
        return False
    value = node.args[2]
    return value[0] == "c" and value[1] == 0 and [pos for pos, _ in dependent_operands(node)] == [0]


def _weights_constant(node: Node) -> bool:
    first = node.args[0] if node.args else None
    return not any(d for r, d in zip(node.refs, node.dep_refs) if first != ("n", r))


def _describe(node: Node, kind: str, module: nn.Module | None) -> tuple[str, Any]:
    """``(name, layer)`` handed to a composite for one call site."""
    if module is not None and node.module is not None:
        try:
            sub = module.get_submodule(node.module)
        except AttributeError:
            sub = None
        if sub is not None and not any(True for _ in sub.children()):
            return node.module, sub
    name = f"{node.module}.{node.name}" if node.module else node.name
    return name, TracedOp(kind, node.target, node.name, node.module, _op_type(node))


def _op_type(node: Node) -> type | None:
    """The ``nn`` class a traced op corresponds to; ``aten.convolution`` by its dims and ``transposed`` flag, a ReLU
    in any spelling (``clamp(x, min=0)``) ``nn.ReLU``."""
    if node.packet == "convolution" and node.shape is not None and 3 <= len(node.shape) <= 5 and len(node.args) > 6:
        transposed = node.args[6] == ("c", True)
        return _OP_TYPES.get(f"conv{'_transpose' if transposed else ''}{len(node.shape) - 2}d")
    return _OP_TYPES.get("relu" if is_relu(node) else node.packet)


def _first_layers(program: Program) -> frozenset[int]:
    """Linear/conv call sites with no linear/conv ancestor: the layers nearest the input."""
    below: list[bool] = [False] * len(program.nodes)
    first = set()
    for node in program.nodes:
        is_layer = node.op == "call" and node.dep and node.packet in WEIGHTED and _weights_constant(node)
        upstream = any(below[r] for r in node.refs)
        if is_layer and not upstream:
            first.add(node.index)
        below[node.index] = upstream or is_layer
    return frozenset(first)


def _check_applicable(rule: Any, kind: str, node: Node) -> None:
    if not hasattr(rule, "backward"):
        raise TypeError(f"the composite returned {rule!r} for {node.describe()}; expected a rule from ax.rules")
    if not _applicable(rule, kind):
        raise ValueError(f"rule {type(rule).__name__} does not apply to {node.describe()} (a {kind} operation)")


def _applicable(rule: Any, kind: str) -> bool:
    ok = True
    if isinstance(rule, LAYER_RULES):
        ok = kind in ("conv", "linear", "avgpool")
    elif isinstance(rule, (GuidedReLU, DeconvReLU)):
        ok = kind == "relu"
    elif isinstance(rule, Norm):
        ok = kind in ("avgpool", "add", "arithmetic", "conv", "linear", "reshape")
    elif isinstance(rule, Uniform):
        ok = kind == "product"
    elif isinstance(rule, HoldScale):
        ok = kind in ("product", "normalize")
    elif isinstance(rule, SoftmaxTaylor):
        ok = kind == "softmax"
    elif isinstance(rule, Attention):
        ok = kind == "attention"
    return ok


def plan_for(program: Program, composite: Any, module: nn.Module | None) -> tuple[Any, ...]:
    """The LRP rule of every call site (the substitution pass with a composite)."""
    firsts = _first_layers(program)

    def rule_for(prog: Program, node: Node) -> Any:
        kind = node_kind(prog, node)
        rule = None
        if composite is not None:
            name, layer = _describe(node, kind, module)
            if isinstance(composite, Composite):
                rule = composite.select(name, layer, kind, node.index in firsts, _op_type(node))
            else:
                rule = composite(name, layer)
            if kind == "reshape" and isinstance(layer, nn.Module) and rule is not None and not _applicable(rule, kind):
                rule = None  # a module's rule is for its layer; its reshapes (GPT-2's Conv1D views) keep the default
        if rule is None:
            rule = _DEFAULTS.get(kind)
        if rule is None:
            return None
        _check_applicable(rule, kind, node)
        return rule.at_site(node) if type(rule) is Attention else rule

    return substitute(program, rule_for, "lrp")


#: rules whose relevance is linear in the relevance they receive, by exact type (a subclass may change ``backward``)
_LINEAR_IN_RELEVANCE = (Epsilon, Gamma, ZPlus, AlphaBeta, Flat, WSquare, ZBox, Pass, Norm, StackedSumNorm,
                        ReLUBetaSmooth, Gradient, Uniform, HoldScale, SoftmaxTaylor, Attention)


def initial_relevance(out: Tensor, target: ResolvedTarget, linear: bool = False) -> tuple[Tensor, Tensor | None]:
    r"""The relevance entering the network, as ``(seed, scale)``: :math:`R_{out}` = ``seed * scale``.

    API.md section 2: :math:`R_{out} = out \odot \partial g / \partial out` for the target's selection
    :math:`g`, so with conservative rules the relevance sums to :math:`g(out)` for every linear
    :math:`g` (differences, weighted sums, ...).

    * Index targets (``g = out[:, t]``): the one-hot unit seed and ``scale`` the selected score, shape
      ``(B,)``, to multiply into the propagated relevance. Every LRP rule is linear in the relevance,
      so this equals seeding ``score * e_t``; for the guided/deconv ReLU rules, which are not odd in
      their input, it is Zennit's convention (its result times the score) also for negative scores.
      With ``linear`` (every rule linear in the relevance: :func:`seeded_by_score`), the seed is
      ``score * e_t`` itself and ``scale`` None: the same numbers, and right also where the model moves samples between rows
      (``h[::2]``, a ``cat`` along the batch), where a sample's relevance comes from another row's score.
    * Callable targets: ``seed = out * dg/dout`` (``g`` differentiated at ``out``) and ``scale=None``.
      For a callable ``out[:, t]`` this is ``score * e_t``: the same as the int target for every rule
      that is linear in the relevance (all LRP rules; not guided/deconv at a negative score).

    Used by ``ax.lrp``, ``ax.conditional`` and ``ax.concepts`` alike.
    """
    if target.kind == "callable":
        value, pullback = torch.func.vjp(lambda o: select(o, target), out)
        return out * pullback(torch.ones_like(value))[0], None
    unit, score = seed(out, target), select(out, target)
    if linear:
        return unit * score.reshape(-1, *[1] * (unit.ndim - 1)).to(unit.dtype), None
    return unit, score


def seeded_by_score(plan: Sequence[Any], model_fn: Any, spec: tuple[Any, ...], batch: int | None, composite: Any,
                    canonize: Any) -> bool:
    """Every rule of ``plan`` (from ``_prepare`` with these arguments) is linear in the relevance it receives, so
    :func:`initial_relevance` may seed the score itself. Compiled, decided at trace time from the caller's
    arguments (dynamo cannot guard on the type of a rule it got as a constant)."""
    if torch.compiler.is_compiling():
        return _seeded_by_score(model_fn, spec, batch, composite, canonize)
    return all(rule is None or type(rule) in _LINEAR_IN_RELEVANCE for rule in plan)


@torch.compiler.assume_constant_result
def _seeded_by_score(model_fn: Any, spec: tuple[Any, ...], batch: int | None, composite: Any, canonize: Any) -> bool:
    plan = _prepare(model_fn, spec, batch, composite, canonize)[1]
    return all(rule is None or type(rule) in _LINEAR_IN_RELEVANCE for rule in plan)


def apply_scale(relevance: Tensor, scale: Tensor | None, batch_dim: int = 0) -> Tensor:
    """``relevance`` times the per-sample ``scale`` of :func:`initial_relevance` (broadcast over dim
    ``batch_dim`` of ``relevance``); unchanged when ``scale`` is None."""
    if scale is None:
        return relevance
    shape = [1] * relevance.ndim
    shape[batch_dim] = -1
    return relevance * scale.reshape(shape).to(relevance.dtype)


#: rules with a gradient form (``Rule.gradient``), by exact type: a subclass may change ``backward``
_GRADIENT_FORM = (Epsilon, Norm, Pass, Uniform, HoldScale, SoftmaxTaylor, Attention)


def gradient_form(plan: tuple[Any, ...]) -> bool:
    r"""Whether every rule of ``plan`` can run in gradient form.

    Every rule of AttnLRP, CP-LRP and the ε composites (ε, Norm, Pass, the product rules, the softmax
    Taylor rule, the gradient on reshapes and max pooling) sends its input :math:`R_{in} = x \odot c`
    for some :math:`c`; with :math:`R = y \odot g` at the output, :math:`c` is a modified gradient
    :math:`g_{in}` computed from :math:`g` without dividing by the relevance: the ε-rule is the true
    transpose of :math:`g \odot z / (z + \epsilon\,\mathrm{sign}\,z)`, the identity rule
    :math:`g \odot f(x)/x`, the uniform rule halves each operand's vjp, the softmax rule is its true
    vjp. The reverse pass then carries :math:`g` (seeded with the target's plain gradient) and the
    relevance is :math:`x \odot g_x` at the input: the same numbers to rounding (an identity rule at an
    input that is exactly 0 gives 0 there), without the stabiliser arithmetic on every node
    (``notes/lrp.md``). Rules without one (z+, αβ, γ, flat, w², z^B, user rules, ``zero_params``): False.
    """
    for rule in plan:
        if rule is None or type(rule) is Gradient:
            continue
        if type(rule) not in _GRADIENT_FORM or getattr(rule, "zero_params", ()):
            return False
    return True


def run_gradient_form(program: Program, plan: tuple[Any, ...], streams: Streams, seeds: dict[int, Any]
                      ) -> dict[int, Any]:
    """The reverse pass of a :func:`gradient_form` plan: ``{input position: modified gradient}``."""
    def backward(node: Node, g: Any) -> dict[int, Any]:
        rule = plan[node.index]
        if rule is None:
            return {}
        site = Site(node, streams)
        for cls in _GRADIENT_FORM:  # by class, as rules.apply_rule: what dynamo can trace
            if isinstance(rule, cls):
                return cls.gradient(rule, site, g)
        return Gradient.backward(rule, site, g)

    if torch.compiler.is_compiling():
        return reverse(program, seeds, backward)
    moves = per_program(program, "gradient_moves", _gradient_moves)
    env = streams.x

    def eager(node: Node, g: Any) -> dict[int, Any]:  # the same, dispatched on the exact type (gradient_form)
        rule = plan[node.index]
        if rule is None:
            return {}
        if type(rule) is Gradient:
            move = moves.get(node.index)
            if move is not None and isinstance(g, Tensor):
                kind, ref, a, b = move
                if kind == "reshape":
                    return {ref: g.reshape(env[ref].shape)}
                if kind == "transpose":
                    return {ref: g.transpose(a, b)}
                if kind == "slice":
                    return {ref: torch.ops.aten.slice_backward(g, list(env[ref].shape), *a)}
                x = env[ref]
                if g.dtype == x.dtype:  # identity, or a cast to the dtype it already has
                    return {ref: g}
                if kind == "cast" and g.dtype in _PLAIN_FLOATS and x.dtype in _PLAIN_FLOATS and (
                        env[node.index].is_floating_point() and x.device == g.device):
                    return {ref: g.to(x.dtype)}  # _transpose._t_cast (float16/bfloat16: the general path)
        return _GRADIENT_BY_TYPE[type(rule)](rule, Site(node, streams), g)

    return reverse(program, seeds, eager)


_RESHAPES = frozenset(("view.default", "_unsafe_view.default", "reshape.default", "flatten.using_ints", "unflatten.int",
                       "squeeze.default", "squeeze.dim", "squeeze.dims"))
_IDENTITIES = frozenset(("clone.default", "contiguous.default", "alias.default", "lift_fresh_copy.default"))
_PLAIN_FLOATS = frozenset((torch.float32, torch.float64))
_CAST_KWARGS = frozenset(("dtype", "non_blocking", "copy", "memory_format", "layout", "device", "pin_memory"))


def _gradient_moves(program: Program) -> dict[int, tuple[str, int, Any, Any]]:
    """``{node: (kind, input, a, b)}``: the nodes whose exact gradient only moves the cotangent (``_transpose``'s
    reshape, transpose and identity transposes), for :func:`run_gradient_form` to apply directly. A transformer
    has a hundred of them (head splits, transposes, eval dropout); the general path costs ~8 us of Python each.
    Only where the input is the node's single tensor argument and the rest are constants."""
    moves: dict[int, tuple[str, int, Any, Any]] = {}
    for node in program.nodes:
        if node.op != "call" or not node.dep or not node.target.startswith("aten.") or node.args[0][0] != "n":
            continue
        op, ref, rest = node.target[5:], node.args[0][1], node.args[1:]
        if len(node.refs) != 1 or node.kwargs and op not in _RESHAPES and not op.startswith("to."):
            continue
        if op in _RESHAPES:
            moves[node.index] = ("reshape", ref, None, None)
        elif op == "transpose.int" and all(a[0] == "c" and type(a[1]) is int for a in rest[:2]):
            moves[node.index] = ("transpose", ref, rest[0][1], rest[1][1])
        elif op == "t.default" and node.shape is not None and len(node.shape) == 2:
            moves[node.index] = ("transpose", ref, 0, 1)
        elif op in _IDENTITIES or op == "dropout.default" and len(rest) == 2 and rest[1] == ("c", False):
            moves[node.index] = ("identity", ref, None, None)
        elif op == "slice.Tensor" and all(a[0] == "c" and (a[1] is None or type(a[1]) is int) for a in rest):
            dim, start, end, step = ([a[1] for a in rest] + [0, None, None, 1][len(rest):])[:4]
            moves[node.index] = ("slice", ref, (dim, start or 0, sys.maxsize if end is None else end, step), None)
        elif op in ("to.dtype", "to.dtype_layout") and not set(k for k, _ in node.kwargs) - _CAST_KWARGS:
            moves[node.index] = ("cast", ref, None, None)
    return moves


_GRADIENT_BY_TYPE: dict[type, Any] = {Gradient: Gradient.backward, **{cls: cls.gradient for cls in _GRADIENT_FORM}}


def canonizers_for(canonize: Any) -> tuple[Any, ...]:
    """The canonizers a ``canonize=`` option asks for: ``True`` merges BatchNorm (the default), ``False`` none,
    a callable or a sequence of callables ``Program -> Program`` (``attrax.canonizers.Canonizer``) are
    applied in order (add ``merge_batchnorm`` to the sequence to keep it)."""
    if canonize is True:
        return (merge_batchnorm,)
    if canonize is False or canonize is None:
        return ()
    fns = (canonize,) if callable(canonize) else tuple(canonize) if isinstance(canonize, (list, tuple)) else None
    if fns is None:
        raise TypeError(f"canonize must be True, False, or a canonizer (a function Program -> Program) or a sequence of "
                        f"them, got {type(canonize).__name__}")
    for i, f in enumerate(fns):
        if not callable(f) or isinstance(f, torch.nn.Module):
            raise TypeError(f"canonize[{i}] must be a function Program -> Program (attrax.canonizers.Canonizer), got "
                            f"{type(f).__name__}; Zennit's canonizer objects patch modules and do not apply here")
    return fns


_FROZEN = "attrax: a dataclass as plain data"


def constant_arg(value: Any) -> Any:
    """``value`` as an argument of :func:`_prepare` / :func:`_prepare_form` (``assume_constant_result``).

    Under ``torch.compile``, dynamo hands such a function a frozen dataclass that was *built inside the compiled
    function* as a default-constructed instance (torch 2.13: ``Composite()``, every field lost), so
    ``torch.compile(lambda x: ax.lrp(..., composite=ax.composites.attn_lrp()))`` silently ran another composite.
    Dataclasses (composites, rules, ``Kind``) therefore cross as tuples of plain data, rebuilt there by
    :func:`_thaw`; outside ``torch.compile`` the value passes as it is."""
    return _freeze(value) if torch.compiler.is_compiling() else value


def _freeze(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return (_FROZEN, type(v), tuple((f.name, _freeze(getattr(v, f.name))) for f in dataclasses.fields(v)))
    if isinstance(v, tuple):
        return tuple(_freeze(e) for e in v)
    if isinstance(v, list):
        return [_freeze(e) for e in v]
    if isinstance(v, dict):
        return {_freeze(k): _freeze(e) for k, e in v.items()}
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple):
        if len(v) == 3 and isinstance(v[0], str) and v[0] == _FROZEN:
            cls, values = v[1], {name: _thaw(e) for name, e in v[2]}
            fields = dataclasses.fields(cls)
            obj = cls(**{f.name: values[f.name] for f in fields if f.init})
            for f in fields:
                if not f.init:
                    object.__setattr__(obj, f.name, values[f.name])
            return obj
        return tuple(_thaw(e) for e in v)
    if isinstance(v, list):
        return [_thaw(e) for e in v]
    if isinstance(v, dict):
        return {_thaw(k): _thaw(e) for k, e in v.items()}
    return v


@torch.compiler.assume_constant_result
def _prepare(model_fn: Any, spec: tuple[Any, ...], batch: int | None, composite: Any, canonize: Any,
             fused: bool = False, release: bool = False) -> Any:
    """Trace, canonize and substitute rules in one step, constant for ``torch.compile`` (it runs once,
    at trace time; its arguments are the caller's own objects, which dynamo can guard on; ``canonize`` is
    the user's option, resolved here). ``fused``: attention kept as one node (:func:`_fused_attention`);
    ``release``: also return :func:`release_plan` where the plan has a gradient form (else None). ``composite`` and
    ``canonize`` may come through :func:`constant_arg`."""
    composite, canonize = _thaw(composite), _thaw(canonize)
    canonize = canonizers_for(canonize)
    # one fingerprint for the call's three memo lookups (it walks the whole module tree)
    fp = model_fn.fingerprint() if isinstance(model_fn, FunctionalModel) else None
    program = trace_program(model_fn, spec, batch, fp, fused_attention=fused)
    # activations written out in steps run as their one op (every LRP rule treats such a region as one activation)
    program = memoised(model_fn, ("fuse_elementwise", spec, batch, fused),
                       lambda p=program: fuse_elementwise(p), fingerprint=fp)
    for i, fn in enumerate(canonize):  # memoised per prefix of the sequence: each step's input is determined by it
        program = memoised(model_fn, ("canonize", canonize[: i + 1], spec, batch, fused),
                           lambda p=program, f=fn: _canonized(f, p), fingerprint=fp)
    comp = as_composite(composite)
    module = getattr(model_fn, "module", None)
    # the plan is data too: memoised per composite value where that is plain data (a transformer's
    # graph has thousands of nodes to classify); a callable composite or one holding tensors is asked anew
    plain = comp is None or (isinstance(comp, Composite) and _plain(comp))
    key = (spec, batch, canonize, comp, fused, False)
    if release and plain:  # lrp: relevance at the input only, so a selected head may run on the selected rows
        # where the head's rule treats rows alone (norm_scale's stabiliser is a mean over all of them, ZBox's
        # bounds may be shaped like them, a user's rule may do anything)
        whole = memoised(model_fn, ("lrp_plan", *key), lambda p=program: plan_for(p, comp, module), fingerprint=fp)
        shapes = {name: shape for name, shape, *_ in spec[0]}
        moved = memoised(model_fn, ("select_first", *key), lambda p=program: _rows_first(p, whole, shapes),
                         fingerprint=fp)
        key = (*key[:-1], moved is not program)  # the moved program's plan apart from the traced one's
        program = moved
    rules = memoised(model_fn, ("lrp_plan", *key), lambda p=program: plan_for(p, comp, module), fingerprint=fp) \
        if plain else plan_for(program, comp, module)
    if not release:
        return program, rules
    if not gradient_form(rules):
        return program, rules, None
    drop = memoised(model_fn, ("lrp_release", *key), lambda: release_plan(program, rules), fingerprint=fp) \
        if plain else release_plan(program, rules)
    return program, rules, drop


#: ops whose transposes read their input's shape and dtype only (views, copies, casts, slices, concatenation)
_SHAPE_OPS = frozenset(
    """view _unsafe_view reshape permute transpose t unsqueeze squeeze expand slice select cat concat flatten
    unflatten contiguous clone alias _to_copy to split split_with_sizes narrow""".split())
#: parameter-free linear ops whose transposes read the constant operand, not the input-dependent one
_LINEAR_OPS = frozenset(("add", "sub", "neg", "mul", "div"))


def _shape_only(program: Program, node: Node, rule: Any) -> bool:
    """The node's rule (gradient form) reads its input-dependent operands only for their shapes: the
    gradient through a shape op, Norm through a sum or a scaling by a constant (which reads its own output
    where ε > 0)."""
    if type(rule) is Gradient and node.packet in _SHAPE_OPS:
        return True
    if type(rule) is Norm and not (rule.clip or rule.norm_scale) and node.packet in _LINEAR_OPS:
        ops = dependent_operands(node)
        return node.packet in ("add", "sub", "neg") or (len(ops) == 1 and (node.packet == "mul" or ops[0][0] == 0))
    return False


def release_plan(program: Program, plan: tuple[Any, ...]) -> tuple[tuple[tuple[int, bool], ...], ...]:
    """For ``forward(drop=...)``: after node k, the values that no later node reads and the gradient-form
    reverse pass of ``plan`` reads at most the shape of.

    The reverse pass visits only nodes that receive a cotangent: from the output through each rule's
    receiving operands (an identity rule at an elementwise region sends to the region's source, not to its
    inner nodes; a held scale or gate and an attention operand with share 0 receive nothing), and a visited
    rule reads at most its node's output and arguments (the identity rule at a region: the output and the
    source; shape ops and LRP-0 sums/scalings: their input-dependent arguments' shapes only, see
    :func:`_shape_only`; the ε-rule at a dense layer: not its input). So a written-out GELU's or a
    normalisation's inner values, rotary products and everything on held branches are released as soon as
    the forward is past them.
    """
    n = len(program.nodes)
    reached = [False] * n
    reached[program.output] = True
    values = {program.output}  # read by value
    shapes: set[int] = set()  # read for their shape
    for node in reversed(program.nodes):
        i = node.index
        if not reached[i] or node.op != "call" or not node.dep:
            continue
        rule = plan[i]
        dep_refs = [r for r, d in zip(node.refs, node.dep_refs) if d]
        if node.target == "getitem" or rule is None:
            values.add(i)
            values.update(node.refs)
            for r in dep_refs:
                reached[r] = True
            continue
        ops = dependent_operands(node)
        if type(rule) is Pass and (len(ops) != 1 or ops[0][0] != 0):
            src = region_source(program, node)
            src = ops[0][1] if src is None and len(ops) == 1 else src
            if src is not None:
                values.update((i, src))
                reached[src] = True
                continue
        if _shape_only(program, node, rule):
            shapes.update(dep_refs)
            values.update(r for r in node.refs if r not in dep_refs)
            if type(rule) is Norm and rule.stabilizer != 0:
                values.add(i)
        elif type(rule) is Epsilon and node.packet == "linear" and not rule.zero_params and len(ops) == 1:
            values.add(i)
            shapes.update(dep_refs)
            values.update(r for r in node.refs if r not in dep_refs)
        else:
            if not (type(rule) in (HoldScale, Uniform) and node.packet == "mul"):  # g * other operand: no output
                values.add(i)
            values.update(node.refs)
        receiving = dep_refs
        if type(rule) in (HoldScale, Uniform) and len(ops) == 2:
            held = scale_operand(program, node) if type(rule) is HoldScale else None
            receiving = [ref for k, (_, ref) in enumerate(ops) if k != held]
        elif type(rule) is Attention:
            shares = (rule.query, rule.key, rule.value)  # resolved per site by plan_for
            receiving = [ref for pos, ref in ops if pos < 3 and shares[pos]]
        for r in receiving:
            reached[r] = True
    last = list(range(n))  # the last node that reads each value in the forward (itself if none)
    for node in program.nodes:
        for r in node.refs:
            last[r] = max(last[r], node.index)
    drop: list[list[tuple[int, bool]]] = [[] for _ in range(n)]
    for node in program.nodes:
        if node.op == "call" and node.index not in values:
            drop[last[node.index]].append((node.index, node.index in shapes))
    return tuple(tuple(d) for d in drop)


@torch.compiler.assume_constant_result
def _prepare_form(model_fn: Any, spec: tuple[Any, ...], batch: int | None, composite: Any, canonize: Any, form: str
                  ) -> tuple[Program, tuple[Any, ...], Any]:
    """:func:`_prepare` for ``lrp(form=...)``, and ``drop`` (:func:`release_plan`) where the plan runs in gradient
    form, else None (decided here, where ``torch.compile`` treats it as a constant)."""
    composite, canonize = _thaw(composite), _thaw(canonize)
    fused = form != "relevance" and _fused_attention(composite)
    if form == "relevance":
        return (*_prepare(model_fn, spec, batch, composite, canonize), None)
    program, plan, drop = _prepare(model_fn, spec, batch, composite, canonize, fused, release=True)
    if fused and (drop is None or not per_program(program, "fusable", _fusable)):
        # attention decomposed: another rule needs the relevance form, or a mask depends on the input / dropout is
        # on (the fused rule has no part for those)
        program, plan, drop = _prepare(model_fn, spec, batch, composite, canonize, False, release=True)
    if form == "gradient" and drop is None:
        raise ValueError("form='gradient': a rule of this composite has no gradient form (z+, alpha-beta, gamma, "
                         "flat, w-square, z-box, zero_params or a user rule); use form='relevance' or 'auto'")
    return program, plan, drop


def _rows_first(program: Program, rules: Sequence[Any], shapes: dict[str, tuple[int, ...]]) -> Program:
    """The program with a selection of the output's rows (``output=lambda o: o.logits[:, -1]``) moved up through every
    node computed row by row whose rule treats rows alone (:func:`rewrite.select_pushdown`): the head, final norm
    and last block's MLP of an LM run on the selected position; where nothing moves that way, the head alone
    (:func:`rewrite.select_before_linear`). Relevance at the input is the same (rows outside the selection get none)."""
    by_name = {n.name: rules[n.index] for n in program.nodes}
    dense = dense_layers(program, shapes)
    pushed = select_pushdown(dense, shapes, lambda node: node.name in by_name and _rows_alone(by_name[node.name]))
    if pushed is not dense:
        return pushed
    return select_before_linear(program, lambda i: _row_local(rules[i]))


def _rows_alone(rule: Any) -> bool:
    """A node's rule treats each row of its output alone: a dense layer's row-local rule, or an elementwise one."""
    return rule is None or _row_local(rule) or type(rule) in (Pass, HoldScale, Uniform)


def _row_local(rule: Any) -> bool:
    """The rule at a dense layer treats each row of its output alone (what :func:`select_before_linear` needs)."""
    return type(rule) in (Epsilon, Norm, Gradient, ZPlus, AlphaBeta, Gamma, Flat, WSquare) and not getattr(
        rule, "norm_scale", False)


def _fusable(program: Program) -> bool:
    """Every attention node can take the fused rule: only q, k, v depend on the input (not the mask) and
    dropout is off."""
    for node in program.nodes:
        if node.op == "call" and node.packet == "scaled_dot_product_attention":
            if any(pos >= 3 for pos, _ in dependent_operands(node)):
                return False
            p = node.args[4] if len(node.args) > 4 else dict(node.kwargs).get("dropout_p", ("c", 0.0))
            if not (isinstance(p, tuple) and p[0] == "c" and not p[1]):
                return False
    return True


def _fused_attention(composite: Any) -> bool:
    """The composite has a rule for ``Kind("attention")`` (``attn_lrp``, ``cp_lrp``): trace with
    ``scaled_dot_product_attention`` kept as one node, whose rule runs the fused kernel's backward."""
    comp = as_composite(composite)
    return isinstance(comp, Composite) and (any(
        isinstance(k, Kind) and k.name == "attention" for k, _ in (*comp.by_type, *comp.first))
        or any(isinstance(r, Attention) for _, r in comp.by_name))


def _canonized(fn: Any, program: Program) -> Program:
    out = fn(program)
    if not isinstance(out, Program):
        raise TypeError(f"canonizer {getattr(fn, '__name__', fn)!r} must return a Program, got {type(out).__name__}")
    return out


def _plain(composite: Composite) -> bool:
    """Every key and rule of the composite is hashable plain data (no tensors, no callables)."""
    def plain(v: Any) -> bool:
        if v is None or isinstance(v, (bool, int, float, str, type, Kind)):
            return True
        if isinstance(v, tuple):
            return all(plain(e) for e in v)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return all(plain(getattr(v, f.name)) for f in dataclasses.fields(v))
        return False

    try:
        hash(composite)
    except TypeError:  # a rule that is a mutable dataclass
        return False
    return plain((composite.by_name, composite.by_type, composite.first, composite.default))


@forward_args
def lrp(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    composite: Any = None,
    canonize: Any = True,
    check_finite: bool = True,
    form: str = "auto",
) -> TensorOrTuple:
    r"""Layer-wise relevance propagation [1] with rules chosen per layer by a composite.

    The relevance entering the network is the selected output value :math:`f_t(x)`
    (Zennit seeds 1 instead: Zennit's result times the score equals this one; all rules are
    linear in the relevance, so attrax propagates the unit seed and scales by the score); for a
    callable target :math:`g` it is :math:`out \odot \partial g/\partial out`, which sums to
    :math:`g(out)` for every linear :math:`g` (a logit difference, a weighted sum). Relevance then
    flows back through every call site with its rule: ``composite=None`` means LRP-ε
    (ε = 1e-6) on every (transposed) convolution and linear layer, Norm on residual sums and average
    pooling, Pass through activations (also written-out ones such as GPT-2's ``gelu_new``), the exact
    gradient through max pooling and reshapes, and at products of two activations the normalisation
    scale or gate held constant (``HoldScale``: LayerNorm/RMSNorm scales, attention weights,
    squeeze-excitation and gated-MLP gates). With ε → 0 on a bias-free ReLU network this equals
    ``input_x_gradient``. Transformers: ``composite=ax.composites.attn_lrp()`` or ``cp_lrp()``.

    Args:
        composite: ``None``, an ``ax.composites`` factory result (``epsilon_plus()``,
            ``epsilon_gamma_box(low=-3, high=3)``, ...), a dict from layer type or dotted-name glob
            to rule, or any callable ``(name, layer) -> Rule | None``.
        canonize: ``True``: fold eval-mode BatchNorm into the adjacent linear layer/convolution first
            (``False``: no canonizer); or your own canonizers, a function ``Program -> Program`` or a
            sequence of them applied in order (``attrax.canonizers.Canonizer``; include
            ``attrax.canonizers.merge_batchnorm`` to keep the default). The remaining doc of the default:
            (a graph transform; the module is not modified). Unmerged BatchNorms pass relevance.
        form: ``"auto"`` (default): propagate modified gradients (relevance = input x modified
            gradient, :func:`gradient_form`) where every rule of the plan has that form (AttnLRP, CP-LRP,
            ε composites), relevance otherwise; ``"relevance"`` or ``"gradient"`` force one (the latter
            raises where a rule has no gradient form). Both give the same numbers to rounding, except that
            ``attn_lrp``/``cp_lrp`` keep ``scaled_dot_product_attention`` fused in gradient form (its ε is at
            the attention output, not at the scores: relative ε/|score|) and a user's ``Attention`` rule
            applies in gradient form only (notes/lrp.md).
    Returns:
        Relevance with the shape, dtype and device of ``x``.
    Raises:
        ValueError: For bad inputs, a rule that does not fit its layer, or an operation without a
            relevance rule (e.g. ``torch.sort``), named with its module.
    References:
        [1] Bach et al. On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
            Layer-Wise Relevance Propagation. PLoS ONE 10(7), 2015.
        [2] Montavon et al. Layer-Wise Relevance Propagation: An Overview. 2019.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 5, bias=False), torch.nn.ReLU(), torch.nn.Linear(5, 3, bias=False)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> x = torch.rand(2, 4)
        >>> r = ax.lrp(model_fn, params, x, 1, composite=ax.composites.epsilon_plus())
        >>> torch.allclose(r.sum(1), model_fn(params, x)[:, 1], atol=1e-5)
        True
    """
    if form not in ("auto", "relevance", "gradient"):
        raise ValueError(f"form must be 'auto', 'relevance' or 'gradient', got {form!r}")
    xs, params, is_tuple, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite)
    as_composite(composite)  # validate eagerly
    spec, trace_batch = program_spec(model_fn, params, xs)
    canonizers_for(canonize)  # validate eagerly
    refuse_bound_in_compiled_code(model_fn, "lrp")
    program, plan, drop = _prepare_form(model_fn, spec, trace_batch, constant_arg(composite), constant_arg(canonize),
                                        form)
    with eager_no_grad():
        aux: dict[int, Any] = {}
        env = forward(program, params, xs, aux=aux, drop=drop)
        out = env[program.output]
        publish_output(xs, out)
        if drop is not None:
            g = seed(out, t)
            plain = plain_eager(out, g)  # then so is every value the pass makes (no grad, no transform)
            streams = Streams(program, env, None, batch, aux, consume=consumable(program) if plain else frozenset(),
                              plain=plain)  # one reverse pass: a rule may write over its node's value
            grads = run_gradient_form(program, plan, streams, {program.output: g})
            result = tuple(xi * grads[i].to(xi.dtype) if i in grads else torch.zeros_like(xi) for i, xi in enumerate(xs))
            return result if is_tuple else result[0]
        linear = seeded_by_score(plan, model_fn, spec, trace_batch, constant_arg(composite), constant_arg(canonize))
        start, scale = initial_relevance(out, t, linear)
        grads = run_plan(program, plan, Streams(program, env, None, batch, aux), {program.output: start})
        result = tuple(apply_scale(grads[i], scale) if i in grads else torch.zeros_like(xi) for i, xi in enumerate(xs))
    return result if is_tuple else result[0]

