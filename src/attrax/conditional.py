r"""Conditional attribution (concept relevance, as in zennit-crp) on the rewrite engine.

A *condition* ``{"features.10": [3, 7]}`` restricts the relevance at a layer's output to
the listed channels; the heatmap then shows which input features the concept carried by
those channels responds to (Achtibat et al., From attribution maps to human-understandable
explanations through Concept Relevance Propagation, Nat. Mach. Intell. 2023).

``ax.conditional`` evaluates the model once and runs the relevance backward for all conditions
at once, vectorised with ``torch.func.vmap`` over the channel masks (``chunk_size`` conditions at a
time). With ``exclude_parallel=True`` relevance conditioned at a layer reaches the input only
*through* that layer: an edge that carries relevance from below the layer into a branch that
bypasses it (a skip connection, a parallel path) is cut, using the traced graph. With
``exclude_parallel=False`` those branches keep their unconditioned relevance, which then leaks
into every conditional heatmap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target, TensorOrTuple
from .core import check_positive_int, chunks, eager_no_grad, publish_output, forward_args, refuse_bound_in_compiled_code
from .lrp import _prepare, constant_arg, apply_scale, initial_relevance, seeded_by_score
from .rewrite import Node, Program, Streams, forward, program_spec
from .rules import run_plan
from .rules.graph import channel_first
from .targets import prepare_call

__all__ = ["conditional", "layer_nodes"]


def layer_nodes(program: Program, layer: str) -> tuple[int, ...]:
    """The nodes whose value is the output of ``layer``: a dotted module path (the last node of every
    call of the module, e.g. both calls of a reused ReLU), a graph node name, or
    ``"<attention module>:heads"``: the per-head attention output ``softmax(q k^T) v`` of shape
    (B, heads, T, head_dim) inside that module (channels = heads)."""
    if layer.endswith(":heads"):
        return _head_nodes(program, layer[: -len(":heads")])
    for node in program.nodes:
        if node.name == layer and node.op == "call":
            return (node.index,)
    calls: dict[str, int] = {}  # call key -> last node of that call
    for node in program.nodes:
        if node.op != "call" or not node.dep:
            continue
        for key, path in node.stack:
            if path == layer:
                calls[key] = node.index
        if layer in node.aliases:  # a BatchNorm folded into this layer
            calls[f"{layer}#{node.index}"] = node.index
    if not calls:
        modules = sorted({path for n in program.nodes for _, path in n.stack})
        if not modules:  # a plain function f(params, x), or modules called outside the trace's view
            names = [n.name for n in program.nodes if n.op == "call" and n.dep]
            raise ValueError(
                f"layer {layer!r}: the traced graph has no module calls (model_fn wraps a plain function, so there "
                f"are no module paths); name a node of the graph instead, e.g. {names[:12]}"
                f"{' ...' if len(names) > 12 else ''}, or functionalize the nn.Module itself")
        raise ValueError(
            f"layer {layer!r} is neither a module path nor a node of the traced graph (or it was folded away by "
            f"canonization: pass canonize=False); module paths include {modules[:12]}{' ...' if len(modules) > 12 else ''}"
        )
    return tuple(sorted(set(calls.values())))


def _head_nodes(program: Program, module: str) -> tuple[int, ...]:
    """The attention products ``weights @ v`` (weights from a softmax) inside ``module``'s calls."""
    def from_softmax(i: int) -> bool:
        while True:
            n = program.nodes[i]
            if n.packet in ("softmax", "_softmax"):
                return True
            if n.op != "call" or n.packet not in ("dropout", "_to_copy", "to", "view", "reshape", "clone", "contiguous",
                                                  "expand", "mul", "alias") or not n.refs:
                return False
            i = n.args[0][1] if n.args and n.args[0][0] == "n" else n.refs[0]

    found = tuple(n.index for n in program.nodes
                  if n.op == "call" and n.dep and n.packet in ("matmul", "bmm") and len(n.shape or ()) == 4
                  and any(path == module for _, path in n.stack) and n.args and n.args[0][0] == "n"
                  and from_softmax(n.args[0][1]))
    if not found:
        raise ValueError(f"layer {module + ':heads'!r}: no attention (softmax(q k^T) v with a head dim) inside module "
                         f"{module!r}")
    return found


def _descendants(program: Program, starts: Sequence[int]) -> set[int]:
    seen = set(starts)
    for node in program.nodes:
        if node.index not in seen and any(r in seen for r in node.refs):
            seen.add(node.index)
    return seen


def _check_conditions(conditions: Any) -> list[dict[str, list[int]]]:
    if isinstance(conditions, Mapping) or not isinstance(conditions, Sequence) or not conditions:
        raise TypeError("conditions must be a non-empty list of dicts {'<layer>': [channel, ...]}")
    out = []
    for i, cond in enumerate(conditions):
        if not isinstance(cond, Mapping) or not cond:
            raise TypeError(f"conditions[{i}] must be a non-empty dict {{'<layer>': [channel, ...]}}, got {cond!r}")
        parsed = {}
        for layer, chans in cond.items():
            if not isinstance(layer, str):
                raise TypeError(f"conditions[{i}] keys must be layer names (str), got {layer!r}")
            chans = [chans] if isinstance(chans, int) else list(chans)
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in chans):
                raise TypeError(f"conditions[{i}][{layer!r}] must be a list of channel indices, got {chans!r}")
            parsed[layer] = chans
        out.append(parsed)
    return out


def _masks(program: Program, env: list[Any], conditions: list[dict[str, list[int]]], exclude_parallel: bool
           ) -> tuple[dict[int, Tensor], dict[tuple[int, int], Tensor]]:
    """Per conditioned node a ``(K, C)`` channel mask, and per cut edge a ``(K,)`` keep factor."""
    k = len(conditions)
    layers = sorted({layer for cond in conditions for layer in cond})
    nodes = {layer: layer_nodes(program, layer) for layer in layers}
    masks: dict[int, Tensor] = {}
    dims: dict[int, int] = {}
    for layer in layers:
        for n in nodes[layer]:
            value = env[n]
            if not isinstance(value, Tensor) or value.ndim < 2:
                raise ValueError(f"layer {layer!r} has no channel dimension (output shape {getattr(value, 'shape', None)})")
            dims[n] = 1 if layer.endswith(":heads") else channel_dim(program, n, value.ndim)
            channels = value.shape[dims[n]]
            m = torch.ones(k, channels, dtype=value.dtype, device=value.device)
            for i, cond in enumerate(conditions):
                if layer in cond:
                    bad = [c for c in cond[layer] if not 0 <= c < channels]
                    if bad:
                        raise ValueError(f"conditions[{i}][{layer!r}] has channels {bad} outside [0, {channels})")
                    m[i] = 0
                    m[i, cond[layer]] = 1
            masks[n] = m if n not in masks else masks[n] * m  # two names for one node (a folded BatchNorm)
    keep: dict[tuple[int, int], Tensor] = {}
    if exclude_parallel:
        for layer in layers:
            inside = set(nodes[layer])
            below = _descendants(program, nodes[layer])
            for node in program.nodes:
                if node.index not in below or node.index in inside:
                    continue
                for ref, dep in zip(node.refs, node.dep_refs):
                    if dep and ref not in below:
                        factor = keep.setdefault((node.index, ref), torch.ones(k, device=masks[nodes[layer][0]].device))
                        for i, cond in enumerate(conditions):
                            if layer in cond:
                                factor[i] = 0
    return {n: (m, dims[n]) for n, m in masks.items()}, keep


def channel_dim(program: Program, node: int, ndim: int) -> int:
    """Where a layer's channels are: dim 1 for (B, C) and conv-style (B, C, *spatial) outputs, the last
    dim for token layouts (B, T, D) (transformer linear layers, attention, embeddings)."""
    return 1 if ndim <= 2 or channel_first(program, node) else ndim - 1


@forward_args
def conditional(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    conditions: Sequence[Mapping[str, Sequence[int]]],
    *,
    composite: Any = None,
    exclude_parallel: bool = True,
    chunk_size: int | None = None,
    canonize: bool = True,
    check_finite: bool = True,
) -> TensorOrTuple:
    r"""Conditional LRP heatmaps: one per condition, relevance restricted to chosen channels.

    Each condition maps layer names (dotted module paths, or graph node names) to channel
    lists; relevance arriving at a listed layer's output is kept on those channels only. A
    condition may name several layers (the relevance must pass all of them). The target is
    the usual ``target`` argument. Relevance convention and rules as in :func:`ax.lrp`.

    Because relevance propagation is linear in the relevance, the heatmaps of a layer's
    channels, one condition per channel, sum to the unconditional heatmap when every path from
    the output to the input passes through that layer.

    Args:
        conditions: List of dicts ``{"<layer>": [channel, ...]}``.
        composite, canonize: As in :func:`ax.lrp`.
        exclude_parallel: Relevance conditioned at a layer reaches the input only through that
            layer (cuts skip connections and parallel branches around it).
        chunk_size: At most this many conditions are propagated at once.
    Returns:
        Tensor of shape ``(len(conditions), *x.shape)`` (a tuple for tuple inputs).
    Raises:
        TypeError, ValueError: For malformed conditions, unknown layers, channels out of range.
    References:
        [1] Achtibat et al. From attribution maps to human-understandable explanations through
            Concept Relevance Propagation. Nature Machine Intelligence 5, 2023.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> x = torch.randn(2, 1, 4, 4)
        >>> heat = ax.conditional(model_fn, params, x, 1, [{"1": [c]} for c in range(4)])
        >>> torch.allclose(heat.sum(0), ax.lrp(model_fn, params, x, 1), atol=1e-6)
        True
    """
    xs, params, is_tuple, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite)
    conds = _check_conditions(conditions)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    spec, trace_batch = program_spec(model_fn, params, xs)
    refuse_bound_in_compiled_code(model_fn, "conditional")
    program, plan = _prepare(model_fn, spec, trace_batch, constant_arg(composite), constant_arg(canonize))
    with eager_no_grad():
        aux: dict[int, Any] = {}
        env = forward(program, params, xs, aux=aux)
        out = env[program.output]
        publish_output(xs, out)
        masks, keep = _masks(program, env, conds, bool(exclude_parallel))
        streams = Streams(program, env, None, batch, aux)
        linear = seeded_by_score(plan, model_fn, spec, trace_batch, constant_arg(composite), constant_arg(canonize))
        start, scale = initial_relevance(out, t, linear)
        results: list[list[Tensor]] = [[] for _ in xs]
        for lo, hi in chunks(len(conds), chunk_size):
            chunk = _propagate(program, plan, streams, start, masks, keep, lo, hi, xs)
            for i, r in enumerate(chunk):
                results[i].append(r)
        heat = tuple(apply_scale(torch.cat(r, 0), scale, batch_dim=1) for r in results)
    return heat if is_tuple else heat[0]


def _propagate(program: Program, plan: Any, streams: Streams, start: Tensor, masks: dict[int, Tensor],
               keep: dict[tuple[int, int], Tensor], lo: int, hi: int, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    mask_keys, keep_keys = list(masks), list(keep)
    mask_dims = {k: d for k, (_, d) in masks.items()}

    def one(mask_vals: tuple[Tensor, ...], keep_vals: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        node_mask = dict(zip(mask_keys, mask_vals))
        edge_keep = dict(zip(keep_keys, keep_vals))

        def arrive(node: Node, g: Any) -> Any:
            m = node_mask.get(node.index)
            if m is None:
                return g
            shape = [1] * g.ndim
            shape[mask_dims[node.index]] = -1
            return g * m.reshape(shape)

        def leave(node: Node, grads: dict[int, Any]) -> dict[int, Any]:
            if not edge_keep:
                return grads
            return {r: (v * edge_keep[(node.index, r)] if (node.index, r) in edge_keep else v) for r, v in grads.items()}

        grads = run_plan(program, plan, streams, {program.output: start}, arrive=arrive, leave=leave)
        return tuple(grads[i] if i in grads else torch.zeros_like(xi) for i, xi in enumerate(xs))

    mask_vals = tuple(masks[k][0][lo:hi] for k in mask_keys)
    keep_vals = tuple(keep[k][lo:hi] for k in keep_keys)
    return torch.func.vmap(one)(mask_vals, keep_vals)

