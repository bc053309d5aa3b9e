"""Exact vector-Jacobian products of single ops, written as explicit transposes.

Used by :func:`attrax.rewrite.exact_vjp` for the common layers so their forward is not
recomputed; every function returns ``{ref node index: cotangent}`` or None to fall back to
``torch.func.vjp`` of the op. All are ordinary differentiable tensor code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._node import Node, _ntuple, _refs

def _dep(node: Node, ref: int) -> bool:
    for r, d in zip(node.refs, node.dep_refs):
        if r == ref:
            return d
    return False


def _t_conv(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    if kw or not _is_ref(node.args[0]) or any(_dep(node, r) for r in _refs(node.args[1:])):
        return None
    x, w = args[0], args[1]
    nd = w.ndim - 2
    if node.packet == "convolution":
        _, _, bias, stride, padding, dilation, transposed, output_padding, groups = args
        if transposed:
            return None
    else:
        if len(args) > 4 and isinstance(args[4], str):
            return None  # padding="same"/"valid"
        stride = args[3] if len(args) > 3 else 1
        padding = args[4] if len(args) > 4 else 0
        dilation = args[5] if len(args) > 5 else 1
        groups = args[6] if len(args) > 6 else 1
        output_padding = 0
    gx = torch.ops.aten.convolution_backward(
        g, x, w, None, _ntuple(stride, nd), _ntuple(padding, nd), _ntuple(dilation, nd), False,
        _ntuple(output_padding, nd), groups, [True, False, False],
    )[0]
    return {node.args[0][1]: gx}


def _is_ref(e: Any) -> bool:
    return isinstance(e, tuple) and e[0] == "n"


def _t_linear(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    if kw or not _is_ref(node.args[0]) or any(_dep(node, r) for r in _refs(node.args[1:])):
        return None
    return {node.args[0][1]: g.matmul(args[1].to(g.dtype))}


def _t_batch_norm(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Any) -> dict[int, Any] | None:
    x, weight, _, _, running_var = args[:5]
    if node.packet == "batch_norm":
        training, eps = args[5], args[7]
    else:  # _native_batch_norm_legit_no_training(input, weight, bias, mean, var, momentum, eps)
        training, eps = False, args[6]
        g = g[0]
    if training or kw or any(_dep(node, r) for r in _refs(node.args[1:])):
        return None
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shape = [1, -1] + [1] * (x.ndim - 2)
    return {node.args[0][1]: g * scale.reshape(shape)}


def t_max_pool(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    nd = {"max_pool2d": 2, "max_pool3d": 3}.get(node.packet)
    if nd is None or kw:
        return None
    x, k = args[0], args[1]
    stride = args[2] if len(args) > 2 and args[2] else k
    padding = args[3] if len(args) > 3 else 0
    dilation = args[4] if len(args) > 4 else 1
    ceil = args[5] if len(args) > 5 else False
    p = (_ntuple(k, nd), _ntuple(stride, nd), _ntuple(padding, nd), _ntuple(dilation, nd), ceil)
    if nd == 2:
        _, idx = torch.ops.aten.max_pool2d_with_indices(x, *p)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(g, x, *p, idx)
    else:
        _, idx = torch.ops.aten.max_pool3d_with_indices(x, *p)
        gx = torch.ops.aten.max_pool3d_with_indices_backward(g, x, *p, idx)
    return {node.args[0][1]: gx}


def _t_avg_pool(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    nd = {"avg_pool2d": 2, "avg_pool3d": 3}.get(node.packet)
    if nd is None or kw:
        return None
    x, k = args[0], args[1]
    stride = args[2] if len(args) > 2 and args[2] else k
    rest = list(args[3:]) + [0, False, True, None][len(args[3:]) :]
    padding, ceil, count_include_pad, divisor = rest[:4]
    op = torch.ops.aten.avg_pool2d_backward if nd == 2 else torch.ops.aten.avg_pool3d_backward
    gx = op(g, x, _ntuple(k, nd), _ntuple(stride, nd), _ntuple(padding, nd), ceil, count_include_pad, divisor)
    return {node.args[0][1]: gx}


def _t_adaptive_avg_pool(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    x = args[0]
    if node.packet == "adaptive_avg_pool2d" and x.ndim in (3, 4):
        return {node.args[0][1]: torch.ops.aten._adaptive_avg_pool2d_backward(g, x)}
    if node.packet == "adaptive_avg_pool3d" and x.ndim in (4, 5):
        return {node.args[0][1]: torch.ops.aten._adaptive_avg_pool3d_backward(g, x)}
    return None


def _t_reshape(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    return {node.args[0][1]: g.reshape(args[0].shape)}


def _t_permute(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    dims = [d % g.ndim for d in args[1]]
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return {node.args[0][1]: g.permute(inverse)}


def _t_transpose(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    if node.packet == "t":
        return {node.args[0][1]: g.t()}
    return {node.args[0][1]: g.transpose(args[1], args[2])}


def _t_identity(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    if node.packet == "dropout" and (len(args) < 3 or args[2]):
        return None  # training-mode dropout: not the identity
    if not _is_ref(node.args[0]):
        return None
    return {node.args[0][1]: g.to(args[0].dtype) if g.dtype != args[0].dtype else g}


def _t_cast(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    """``x.to(dtype)`` / ``x.to(other)`` / ``x.type_as(other)`` between float dtypes on one device: the
    identity, the cotangent cast back (HF's RMSNorm casts to float32 and back at every norm)."""
    x = args[0] if args else None
    if not (_is_ref(node.args[0]) and isinstance(x, Tensor) and isinstance(out, Tensor) and isinstance(g, Tensor)):
        return None
    if not (x.is_floating_point() and out.is_floating_point()) or x.device != out.device:
        return None
    if node.packet in ("to", "type_as") and any(_dep(node, r) for r in _refs(node.args[1:])):
        return None  # the target tensor's values never matter, but keep the op's own vjp for odd spellings
    if set(kw) - {"dtype", "non_blocking", "copy", "memory_format", "layout", "device", "pin_memory"}:
        return None
    return {node.args[0][1]: g.to(x.dtype) if g.dtype != x.dtype else g}


def _t_masked_fill(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    """``x.masked_fill(mask, v)`` with a mask and value that do not depend on the input: ``g`` where the
    mask is False, 0 where it is True (attention's causal/padding masks). The mask becomes a 0/1 float
    factor of the mask's own (usually T x T) size, one multiply instead of a masked write (bool selects
    cost several float ops on the CPU builds here, notes/rewrite.md)."""
    if kw or len(args) < 3 or not _is_ref(node.args[0]) or any(_dep(node, r) for r in _refs(node.args[1:])):
        return None
    x, mask = args[0], args[1]
    if not (isinstance(mask, Tensor) and mask.dtype == torch.bool and isinstance(g, Tensor)):
        return None
    keep = mask.logical_not().to(g.dtype)
    return {node.args[0][1]: (g * keep).sum_to_size(x.shape)}


def _t_split(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Any) -> dict[int, Any] | None:
    """``split``/``split_with_sizes`` (GPT-2's fused q/k/v): the pieces' cotangents concatenated back
    (zeros for pieces nothing used)."""
    if kw or not _is_ref(node.args[0]) or not isinstance(out, (tuple, list)):
        return None
    dim = args[2] if len(args) > 2 else 0
    gs = g if isinstance(g, tuple) else (g,)
    if all(gi is None for gi in gs):
        return {}
    pieces = [gs[k] if k < len(gs) and gs[k] is not None else torch.zeros_like(o) for k, o in enumerate(out)]
    dt = next(gi for gi in gs if gi is not None).dtype
    pieces = [p if p.dtype == dt else p.to(dt) for p in pieces]
    return {node.args[0][1]: torch.cat(pieces, dim)}


def _t_add(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    alpha = kw.get("alpha", 1)
    if set(kw) - {"alpha"}:
        return None
    res: dict[int, Any] = {}
    sign = -1 if node.packet in ("sub", "rsub") else 1
    for pos, e in enumerate(node.args[:2]):
        if _is_ref(e) and _dep(node, e[1]):
            scale = 1
            if pos == 1:
                scale = sign * alpha
            if node.packet == "rsub":
                scale = -alpha if pos == 0 else 1
            grad = g if scale == 1 else g * scale
            grad = grad.sum_to_size(args[pos].shape)
            res[e[1]] = grad if e[1] not in res else res[e[1]] + grad
    return res


def _t_mul(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    if kw:
        return None
    res: dict[int, Any] = {}
    for pos, e in enumerate(node.args[:2]):
        if _is_ref(e) and _dep(node, e[1]):
            other = args[1 - pos]
            grad = (g * other).sum_to_size(args[pos].shape) if isinstance(other, Tensor) else g * other
            res[e[1]] = grad if e[1] not in res else res[e[1]] + grad
    return res


def _t_div(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    if kw or (_is_ref(node.args[1]) and _dep(node, node.args[1][1])):
        return None
    d = args[1]
    grad = g / d
    return {node.args[0][1]: grad.sum_to_size(args[0].shape) if isinstance(d, Tensor) else grad}


def _t_neg(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    return {node.args[0][1]: -g}


def _t_cat(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    dim = args[1] if len(args) > 1 else kw.get("dim", 0)
    tensors = args[0]
    # legacy: a 1-d empty tensor is skipped by cat whatever the dim (HF's empty KV-cache start)
    sizes = [0 if t.ndim == 1 and t.numel() == 0 else t.shape[dim] for t in tensors]
    pieces = g.split(sizes, dim=dim)
    res: dict[int, Any] = {}
    for e, piece in zip(node.args[0][1], pieces):
        if _is_ref(e) and _dep(node, e[1]):
            res[e[1]] = piece if e[1] not in res else res[e[1]] + piece
    return res


def _t_mean_sum(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    x = args[0]
    if node.target in ("aten.sum.default", "aten.mean.default"):
        grad = g.expand(x.shape)
        return {node.args[0][1]: grad / x.numel() * 1 if node.packet == "mean" else grad}
    dims = args[1] if len(args) > 1 else kw.get("dim")
    keepdim = args[2] if len(args) > 2 else kw.get("keepdim", False)
    if dims is None:
        return None
    dims = [d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)] or list(range(x.ndim))
    if not keepdim:
        for d in sorted(dims):
            g = g.unsqueeze(d)
    grad = g.expand(x.shape)
    if node.packet == "mean":
        count = 1
        for d in dims:
            count *= x.shape[d]
        grad = grad / count
    return {node.args[0][1]: grad}


def _t_unsqueeze(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    return {node.args[0][1]: g.reshape(args[0].shape)}


def _t_expand(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    return {node.args[0][1]: g.sum_to_size(args[0].shape)}


def _t_relu(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    return {node.args[0][1]: g * (out > 0).to(g.dtype)}


def _t_select(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    x, dim, idx = args[0], args[1], args[2]
    return {node.args[0][1]: torch.ops.aten.select_backward(g, list(x.shape), dim, idx)}


def _t_slice(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    x = args[0]
    dim = args[1] if len(args) > 1 else 0
    start = args[2] if len(args) > 2 and args[2] is not None else 0
    end = args[3] if len(args) > 3 and args[3] is not None else sys.maxsize
    step = args[4] if len(args) > 4 else 1
    return {node.args[0][1]: torch.ops.aten.slice_backward(g, list(x.shape), dim, start, end, step)}


def _t_pad(node: Node, args: list[Any], kw: dict[str, Any], out: Any, g: Tensor) -> dict[int, Any] | None:
    return {node.args[0][1]: torch.ops.aten.constant_pad_nd(g, [-p for p in args[1]])}


TRANSPOSES: dict[str, Callable[..., dict[int, Any] | None]] = {
    **{f"aten.{op}.default": _t_conv for op in ("conv1d", "conv2d", "conv3d", "convolution")},
    "aten.linear.default": _t_linear,
    "aten.batch_norm.default": _t_batch_norm,
    "aten._native_batch_norm_legit_no_training.default": _t_batch_norm,
    "aten.max_pool2d.default": t_max_pool,
    "aten.max_pool3d.default": t_max_pool,
    "aten.avg_pool2d.default": _t_avg_pool,
    "aten.avg_pool3d.default": _t_avg_pool,
    "aten.adaptive_avg_pool2d.default": _t_adaptive_avg_pool,
    "aten.adaptive_avg_pool3d.default": _t_adaptive_avg_pool,
    **{
        f"aten.{op}": _t_reshape
        for op in ("view.default", "_unsafe_view.default", "reshape.default", "flatten.using_ints", "unflatten.int",
                   "squeeze.default", "squeeze.dim", "squeeze.dims")
    },
    "aten.unsqueeze.default": _t_unsqueeze,
    "aten.permute.default": _t_permute,
    "aten.transpose.int": _t_transpose,
    "aten.t.default": _t_transpose,
    **{
        f"aten.{op}": _t_identity
        for op in ("clone.default", "contiguous.default", "alias.default", "lift_fresh_copy.default", "dropout.default",
                   "_to_copy.default")
    },
    **{f"aten.{op}": _t_cast for op in ("to.dtype", "to.dtype_layout", "to.other", "type_as.default")},
    "aten.masked_fill.Scalar": _t_masked_fill,
    "aten.split.Tensor": _t_split,
    "aten.split_with_sizes.default": _t_split,
    "aten.add.Tensor": _t_add,
    "aten.sub.Tensor": _t_add,
    "aten.rsub.Tensor": _t_add,
    "aten.add.Scalar": _t_add,
    "aten.sub.Scalar": _t_add,
    "aten.mul.Tensor": _t_mul,
    "aten.mul.Scalar": _t_mul,
    "aten.div.Tensor": _t_div,
    "aten.div.Scalar": _t_div,
    "aten.neg.default": _t_neg,
    "aten.cat.default": _t_cat,
    "aten.mean.dim": _t_mean_sum,
    "aten.mean.default": _t_mean_sum,
    "aten.sum.dim_IntList": _t_mean_sum,
    "aten.sum.default": _t_mean_sum,
    "aten.expand.default": _t_expand,
    "aten.relu.default": _t_relu,
    "aten.select.int": _t_select,
    "aten.slice.Tensor": _t_slice,
    "aten.constant_pad_nd.default": _t_pad,
}


