r"""Decompositions applied while tracing: fused ops become the primitives that have exact rules.

Normalisation layers and attention are single ATen ops (``layer_norm``, ``rms_norm``,
``group_norm``, ``scaled_dot_product_attention``). Rather than a direct rule per fused op and
method, the tracer (``make_fx(decomposition_table=...)``) writes each as the few primitives every
rule method already handles exactly:

* normalisation: centring (linear), the variance (``pow`` then ``mean``: an elementwise
  nonlinearity and a linear map), the scale :math:`r = \mathrm{rsqrt}(\mathrm{var} + \epsilon)`
  (elementwise), the product :math:`(x - \mu)\,r` (a product of two activations), then the
  affine weight and bias (linear);
* attention: :math:`\mathrm{softmax}(q k^\top s + m)\,v` with two products of activations, a
  constant scale, a constant mask (boolean masks become ``masked_fill`` with the dtype's lowest
  value, as HF's additive masks are, so no :math:`-\infty` reaches a rule) and the softmax;
* ``addmm(b, x, W)`` (GPT-2's ``Conv1D``) becomes ``linear(x, W^\top, b)``, so LRP composites
  and first-layer matching see a linear layer; ``baddbmm`` becomes a batched product plus a
  linear term.

DeepLift's rules on these primitives are exact, so summation-to-delta holds on transformers by
construction; LRP composites give normalisation scales and attention products their own rules
by recognising the pattern (``notes/lrp.md``). The decomposed forward equals the fused op to
rounding (tests). The values of the graph nodes keep the module path of the layer they come from.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["DECOMPOSITIONS", "FUSED_ATTENTION"]

aten = torch.ops.aten


def _norm_dims(normalized_shape: Any) -> tuple[int, ...]:
    return tuple(range(-len(normalized_shape), 0))


def layer_norm(x: Tensor, normalized_shape: Any, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, cudnn_enable: bool = True) -> Tensor:
    dims = _norm_dims(normalized_shape)
    centred = x - x.mean(dims, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def rms_norm(x: Tensor, normalized_shape: Any, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    dims = _norm_dims(normalized_shape)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, cudnn_enabled: bool = True) -> Tensor:
    n, c = x.shape[0], x.shape[1]
    g = x.reshape(n, num_groups, -1)
    centred = g - g.mean(-1, keepdim=True)
    y = (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    affine = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(affine)
    return y if bias is None else y + bias.reshape(affine)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * s
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(keep.logical_not(), lowest)
    rows = None
    if attn_mask is not None:
        # a query row whose keys are all masked (all False, or all -inf) gets 0 from the kernel, not the uniform
        # average the softmax of equal lowest scores gives: zeroed here too, where such a row can occur
        if attn_mask.dtype == torch.bool:
            rows = attn_mask.any(-1, keepdim=True) if _may_mask_a_row(attn_mask) else None
            scores = scores.masked_fill(attn_mask.logical_not(), lowest)
        else:
            rows = (attn_mask > -math.inf).any(-1, keepdim=True) if _may_mask_a_row(attn_mask) else None
            scores = scores + attn_mask.clamp(min=lowest)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = torch.dropout(weights, dropout_p, True)
    out = torch.matmul(weights, v)
    # on the output, not the weights: the product of the softmax with v stays what the rules recognise
    return out if rows is None else out.masked_fill(rows.logical_not(), 0.0)


def _may_mask_a_row(mask: Tensor) -> bool:
    """Whether some query row of a constant ``mask`` has every key masked, read from its values outside the trace
    (no node is recorded), so the usual masks keep the graph the rules know. A boolean mask computed from x or
    params (fake while tracing) is zeroed by nodes of the program; a float one is not (its comparison with -inf
    would be an op without a rule): such a row gets the uniform average."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.utils._python_dispatch import _disable_current_modes

    if torch.compiler.is_compiling():  # the written-out attention's vjp at run time: always (the same values
        return True                    # where no row is fully masked)
    if is_fake(mask):  # computed from x or params (buffers included): checked in the program where that needs no
        return mask.dtype == torch.bool  # rule (any of a bool); a float mask's comparison would: not zeroed
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        keep = mask if mask.dtype == torch.bool else mask > -math.inf
        return not bool(keep.any(-1).all())


def addmm(bias: Tensor, mat1: Tensor, mat2: Tensor, *, beta: Any = 1, alpha: Any = 1) -> Tensor:
    if beta == 1 and alpha == 1 and mat2.ndim == 2 and bias.ndim <= 1:
        return torch.nn.functional.linear(mat1, mat2.t(), bias)
    return bias * beta + torch.mm(mat1, mat2) * alpha


def baddbmm(bias: Tensor, batch1: Tensor, batch2: Tensor, *, beta: Any = 1, alpha: Any = 1) -> Tensor:
    out = torch.bmm(batch1, batch2)
    out = out if alpha == 1 else out * alpha
    return out if beta == 0 else out + (bias if beta == 1 else bias * beta)


DECOMPOSITIONS = {
    aten.layer_norm.default: layer_norm,
    aten.rms_norm.default: rms_norm,
    aten.group_norm.default: group_norm,
    aten.scaled_dot_product_attention.default: scaled_dot_product_attention,
    aten.addmm.default: addmm,
    aten.baddbmm.default: baddbmm,
}

#: the table for programs that keep ``scaled_dot_product_attention`` as one node (LRP in gradient form with
#: an attention rule: its reverse is the fused kernel's own backward, O(T) memory instead of the T x T weights)
FUSED_ATTENTION = {k: v for k, v in DECOMPOSITIONS.items() if k is not aten.scaled_dot_product_attention.default}
