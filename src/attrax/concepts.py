r"""Concepts: channel relevances, attribution graphs and relevance-maximisation atlases.

``relevances`` gives the relevance of each channel of a layer for the target (optionally under
a condition), from one LRP pass. ``graph`` lists the channels of a lower layer that contribute
most to one channel of an upper layer (conditional relevance). ``atlas`` walks a dataset once
and keeps, for every channel of a layer, the top-k samples by relevance and by activation
together with the receptive field of the position where that happened: the reference
samples people look at to name a concept (Achtibat et al., Nat. Mach. Intell. 2023).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target
from .conditional import channel_dim, _check_conditions, _masks, layer_nodes
from .core import eager_no_grad, refuse_bound_in_compiled_code
from .lrp import _prepare, constant_arg, apply_scale, initial_relevance, seeded_by_score
from .rewrite import Node, Program, Site, Streams, exact_vjp, forward, program_spec
from .rules import run_plan
from .targets import check_target, prepare_call

__all__ = ["Atlas", "TopK", "atlas", "graph", "receptive_fields", "relevances"]


def _lrp_pass(model_fn: ModelFn, params: Params, x: Tensor, target: Target, layer: str, composite: Any,
              canonize: bool, condition: Mapping[str, Sequence[int]] | None, exclude_parallel: bool,
              check_finite: bool = True) -> tuple[Tensor, Tensor, Program, tuple[int, ...]]:
    """``(relevance at the layer output (B, C, ...), layer output (B, C, ...), program, layer nodes)``."""
    xs, params, _, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite)
    spec, trace_batch = program_spec(model_fn, params, xs)
    refuse_bound_in_compiled_code(model_fn, "this rule method")
    program, plan = _prepare(model_fn, spec, trace_batch, constant_arg(composite), constant_arg(canonize))
    nodes = layer_nodes(program, layer)
    with eager_no_grad():
        aux: dict[int, Any] = {}
        env = forward(program, params, xs, aux=aux)
        out = env[program.output]
        arrive = leave = None
        if condition is not None:
            masks, keep = _masks(program, env, _check_conditions([condition]), exclude_parallel)
            masks = {k: (m[0], d) for k, (m, d) in masks.items()}
            keep = {k: v[0] for k, v in keep.items()}

            def arrive(node: Node, g: Any) -> Any:
                if node.index not in masks:
                    return g
                m, d = masks[node.index]
                shape = [1] * g.ndim
                shape[d] = -1
                return g * m.reshape(shape)

            def leave(node: Node, grads: dict[int, Any]) -> dict[int, Any]:
                return {r: (v * keep[(node.index, r)] if (node.index, r) in keep else v) for r, v in grads.items()}

        captured: dict[int, Any] = dict.fromkeys(nodes)
        linear = seeded_by_score(plan, model_fn, spec, trace_batch, constant_arg(composite), constant_arg(canonize))
        start, scale = initial_relevance(out, t, linear)
        run_plan(program, plan, Streams(program, env, None, batch, aux), {program.output: start},
                 arrive=arrive, captured=captured, leave=leave)
        rel = sum(torch.zeros_like(env[n]) if captured[n] is None else captured[n] for n in nodes)
        act = env[nodes[-1]]
        rel = apply_scale(rel, scale)
        # channels at dim 1 for every caller: token layers (B, T, D) hold theirs last
        cdim = 1 if layer.endswith(":heads") else channel_dim(program, nodes[-1], act.ndim)
        if cdim != 1:
            rel, act = rel.movedim(cdim, 1), act.movedim(cdim, 1)
    return rel, act, program, nodes


def relevances(
    model_fn: ModelFn,
    params: Params,
    x: Tensor,
    target: Target,
    layer: str,
    *,
    composite: Any = None,
    canonize: bool = True,
    condition: Mapping[str, Sequence[int]] | None = None,
    exclude_parallel: bool = True,
) -> Tensor:
    """Relevance of every channel of ``layer`` for the target: shape ``(B, C)``.

    The relevance arriving at the layer's output (summed over its call sites for a reused
    module, and over spatial positions), in the convention of :func:`ax.lrp`. With
    ``condition``, relevance conditioned at another layer (as in :func:`ax.conditional`).

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> r = ax.concepts.relevances(model_fn, params, torch.randn(2, 1, 4, 4), 1, "1")
        >>> r.shape
        torch.Size([2, 4])
    """
    rel, _, _, _ = _lrp_pass(model_fn, params, x, target, layer, composite, canonize, condition, exclude_parallel)
    return rel.flatten(2).sum(2) if rel.ndim > 2 else rel


def graph(
    model_fn: ModelFn,
    params: Params,
    x: Tensor,
    target: Target,
    layer: str,
    channel: int,
    lower_layer: str,
    *,
    top_k: int = 5,
    composite: Any = None,
    canonize: bool = True,
    exclude_parallel: bool = True,
) -> dict[str, Any]:
    """The channels of ``lower_layer`` that carry most of the relevance of ``channel`` at ``layer``.

    Conditions the relevance on ``{layer: [channel]}`` and ranks the channels of the lower layer
    by the relevance they receive, summed over the batch.

    Returns:
        ``{"layer", "channel", "lower_layer", "relevance": float, "children": [{"channel": int,
        "relevance": float}, ...]}`` (plain Python data, strongest first).
    """
    from .core import check_positive_int

    check_positive_int(top_k, "top_k")
    rel = relevances(model_fn, params, x, target, lower_layer, composite=composite, canonize=canonize,
                     condition={layer: [channel]}, exclude_parallel=exclude_parallel).sum(0)
    top = rel.abs().topk(min(top_k, rel.numel()))
    upper = relevances(model_fn, params, x, target, layer, composite=composite, canonize=canonize).sum(0)
    return {
        "layer": layer,
        "channel": int(channel),
        "lower_layer": lower_layer,
        "relevance": float(upper[channel]),
        "children": [{"channel": int(i), "relevance": float(rel[i])} for i in top.indices],
    }


# ------------------------------------------------------------------ receptive fields


def receptive_fields(model_fn: ModelFn, params: Params, x: Tensor, layer: str) -> Tensor:
    """Input-space bounding boxes of every spatial position of ``layer``'s output.

    Returns ``(n_positions, 2 * d)`` integer boxes ``(start_0, stop_0, start_1, stop_1, ...)``
    (stop exclusive) over the ``d`` spatial dims of ``x``, positions in row-major order. Computed
    from the graph alone: a non-negative footprint is propagated from each position with all
    weights replaced by ones, activations passed through and pooling spread over its window.
    """
    xs, params, _, _, _ = prepare_call(model_fn, params, x[:1], None, check_finite=False)
    from .rewrite import program_for

    program = program_for(model_fn, params, xs)
    nodes = layer_nodes(program, layer)
    with eager_no_grad():
        env = forward(program, params, xs, aux={})
        out = env[nodes[-1]]
        spatial = out.shape[2:]
        n = int(torch.tensor(spatial).prod()) if len(spatial) else 1
        seeds = torch.eye(n, dtype=xs[0].dtype, device=xs[0].device).reshape(n, 1, 1, *spatial).expand(n, *out.shape[:2], *spatial)

        def one(s: Tensor) -> Tensor:
            streams = Streams(program, env, None, 1, {})

            def backward(node: Node, g: Any) -> dict[int, Any]:
                return _footprint(Site(node, streams), g)

            from .rewrite import reverse

            return reverse(program, {nodes[-1]: s}, backward)[0]

        foot = torch.cat([torch.func.vmap(one)(seeds[i : i + 64]) for i in range(0, n, 64)])[:, 0]
    d = xs[0].ndim - 2
    boxes = torch.zeros(n, 2 * d, dtype=torch.long)
    for axis in range(d):  # foot is (n, C, *spatial)
        other = tuple(a for a in range(1, d + 2) if a != axis + 2)
        hit = foot.abs().amax(dim=other) > 0  # (n, size along axis)
        size = hit.shape[1]
        idx = torch.arange(size)
        first = torch.where(hit, idx, size).amin(1)
        last = torch.where(hit, idx, -1).amax(1) + 1
        boxes[:, 2 * axis] = first.clamp(max=size)
        boxes[:, 2 * axis + 1] = torch.maximum(last, first)
    return boxes


def _footprint(site: Site, g: Any) -> dict[int, Any]:
    node, s = site.node, site.streams
    p = node.packet
    args, kwargs = s.args(node)
    if not any(node.dep_refs):
        return {}
    if p in ("conv1d", "conv2d", "conv3d", "linear", "convolution", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d"):
        ones = list(args)
        ones[1] = torch.ones_like(args[1])
        env = list(s.x)
        env[node.args[1][1]] = ones[1]
        return {node.args[0][1]: exact_vjp(s.program, node, env, s.batch, g)[node.args[0][1]].clamp(min=0)}
    if p in ("max_pool1d", "max_pool2d", "max_pool3d"):
        op = {"max_pool1d": torch.nn.functional.avg_pool1d, "max_pool2d": torch.nn.functional.avg_pool2d,
              "max_pool3d": torch.nn.functional.avg_pool3d}[p]
        x = args[0]
        k = args[1]
        stride = args[2] if len(args) > 2 and args[2] else k
        pad = args[3] if len(args) > 3 else 0
        _, pull = torch.func.vjp(lambda t: op(t, k, stride, pad, ceil_mode=bool(args[5]) if len(args) > 5 else False), x)
        return {node.args[0][1]: (pull(g)[0] > 0).to(g.dtype)}
    refs = [r for r, d in zip(node.refs, node.dep_refs) if d]
    shapes = {r: s.x[r].shape for r in refs}
    if all(shapes[r] == getattr(g, "shape", None) for r in refs) and p not in ("permute", "transpose", "t", "flip", "roll"):
        return {r: g for r in refs}  # elementwise: pass the footprint through
    grads = exact_vjp(s.program, node, s.x, s.batch, g)
    return {r: (v != 0).to(g.dtype) for r, v in grads.items()}


# ------------------------------------------------------------------------------ atlas


@dataclass
class TopK:
    """Top-k samples of every channel: ``values``/``ids`` ``(C, k)``, ``boxes`` ``(C, k, 2d)``.

    ``ids`` are positions in the dataset walk (sample index, counting from 0); missing entries
    (fewer samples than k) have id -1.
    """

    values: Tensor
    ids: Tensor
    boxes: Tensor


@dataclass
class Atlas:
    """Reference samples of every channel of ``layer`` by relevance and by activation."""

    layer: str
    samples: int
    relevance: TopK
    activation: TopK


def atlas(
    model_fn: ModelFn,
    params: Params,
    dataset: Iterable[Any],
    layer: str,
    *,
    top_k: int = 8,
    target: Target = None,
    composite: Any = None,
    canonize: bool = True,
    state_file: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Atlas:
    """Relevance maximisation: the top-k samples of every channel of ``layer``, in one walk.

    Ties go to the earlier sample, so the result does not depend on the batching.

    ``dataset`` is an iterable of batches, each a tensor ``x`` or a tuple ``(x, target)``; the
    target is the ``target`` argument if given, else the batch's own, else the predicted class.
    A sample's relevance score for a channel is the channel's relevance (summed over positions);
    its activation score is the channel's maximum activation. Each entry also records the
    receptive field of the position with the largest relevance / activation.

    With ``state_file`` the walk saves its state after every batch (written atomically: a
    temporary file, then a rename) and a later call with the same arguments resumes after the
    last finished batch. A progress bar is shown when tqdm is installed and ``progress`` is True.

    Returns:
        :class:`Atlas` with ``relevance`` and ``activation`` :class:`TopK` tables.
    """
    from .core import check_positive_int

    check_positive_int(top_k, "top_k")
    state = _load_state(state_file, layer, top_k)
    batches = iter(dataset)
    total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
    bar = _progress(total, progress, f"atlas {layer}")
    done, seen = state["batches"], state["samples"]
    for i, item in enumerate(batches):
        if i < done:
            if bar is not None:
                bar.update(1)
            continue
        x, t = _split(item, target, model_fn, params)
        rel, act, _, _ = _lrp_pass(model_fn, params, x, t, layer, composite, canonize, None, True, check_finite=False)
        boxes = state.get("rf")
        if boxes is None:
            boxes = receptive_fields(model_fn, params, x, layer) if act.ndim > 2 else torch.zeros(1, 0, dtype=torch.long)
            state["rf"] = boxes
        for key, scores, where in (
            ("relevance", rel.flatten(2).sum(2) if rel.ndim > 2 else rel, rel),
            ("activation", act.flatten(2).amax(2) if act.ndim > 2 else act, act),
        ):
            pos = where.flatten(2).argmax(2) if where.ndim > 2 else torch.zeros_like(scores, dtype=torch.long)
            _merge_top(state[key], scores.detach().cpu(), pos.cpu(), seen, top_k, boxes)
        seen += x.shape[0]
        state["batches"], state["samples"] = i + 1, seen
        _save_state(state_file, state)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return Atlas(layer, seen, _as_topk(state["relevance"]), _as_topk(state["activation"]))


def _split(item: Any, target: Target, model_fn: ModelFn, params: Params) -> tuple[Tensor, Target]:
    if isinstance(item, Tensor):
        x, t = item, None
    elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Tensor):
        x, t = item
    else:
        raise TypeError("atlas dataset items must be a batch tensor x or a tuple (x, target)")
    if target is not None:
        t = target
    if t is None:
        with torch.no_grad():
            t = model_fn(params, x).argmax(1)
    check_target(t, x.shape[0])
    return x, t


def _merge_top(table: dict[str, Any], scores: Tensor, pos: Tensor, offset: int, k: int, boxes: Tensor) -> None:
    """Merge a batch's ``(B, C)`` scores into the per-channel top-k table."""
    b, c = scores.shape
    ids = torch.arange(offset, offset + b).unsqueeze(1).expand(b, c)
    new_boxes = boxes[pos.clamp(max=boxes.shape[0] - 1)] if boxes.shape[1] else torch.zeros(b, c, 0, dtype=torch.long)
    if table["values"] is None:
        vals, idx, bx = scores.T, ids.T, new_boxes.transpose(0, 1)
    else:
        vals = torch.cat([table["values"], scores.T.to(table["values"].dtype)], 1)
        idx = torch.cat([table["ids"], ids.T], 1)
        bx = torch.cat([table["boxes"], new_boxes.transpose(0, 1)], 1)
    kk = min(k, vals.shape[1])
    # a stable sort: on ties the earlier sample (already in the table, or lower id) wins, so the
    # result does not depend on how the dataset is batched
    order = vals.sort(dim=1, descending=True, stable=True).indices[:, :kk]
    table["values"] = vals.gather(1, order)
    table["ids"] = idx.gather(1, order)
    table["boxes"] = bx.gather(1, order.unsqueeze(2).expand(-1, -1, bx.shape[2]))


def _as_topk(table: dict[str, Any]) -> TopK:
    return TopK(table["values"], table["ids"], table["boxes"])


def _load_state(path: Any, layer: str, k: int) -> dict[str, Any]:
    fresh = {"layer": layer, "k": k, "batches": 0, "samples": 0, "rf": None,
             "relevance": {"values": None, "ids": None, "boxes": None},
             "activation": {"values": None, "ids": None, "boxes": None}}
    if path is None or not os.path.exists(path):
        return fresh
    state = torch.load(path, weights_only=False)
    if state.get("layer") != layer or state.get("k") != k:
        raise ValueError(f"state_file {str(path)!r} belongs to another walk (layer {state.get('layer')!r}, top_k "
                         f"{state.get('k')}); remove it or pass another path")
    return state


def _save_state(path: Any, state: dict[str, Any]) -> None:
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".atlas-", suffix=".tmp")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, path)


def _progress(total: int | None, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False)
