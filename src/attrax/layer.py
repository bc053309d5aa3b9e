r"""Layer attribution: activations, Grad-CAM, layer IG, conductance, gradient x activation.

The layer is named by a dotted module path or a graph node name and found in the traced graph
(no hooks). The graph is split there: :math:`f = f_{\text{top}} \circ L`, where
:math:`f_{\text{top}}(a)` recomputes only the nodes downstream of the layer from a given activation
``a`` (everything else, e.g. a skip connection that bypasses the layer, keeps its value at ``x``).
Gradients with respect to the layer are gradients of :math:`f_{\text{top}}`.
"""

from __future__ import annotations

import re

from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target
from .conditional import layer_nodes
from .core import baselines_for, check_positive_int, chunks, eager_no_grad, forward_args
from .gradients import check_quadrature, grad_of_selected, quadrature
from .rewrite import Program, forward, program_for, run_node
from .targets import ResolvedTarget, prepare_call, select

__all__ = ["activation", "conductance", "grad_cam", "gradient_x_activation", "guided_grad_cam", "integrated_gradients"]


class _Split:
    """A program split at one node: the forward at ``x`` and ``f_top`` from that node's value."""

    def __init__(self, model_fn: ModelFn, params: Params, xs: tuple[Tensor, ...], layer: str) -> None:
        self.program: Program = program_for(model_fn, params, xs)
        nodes = layer_nodes(self.program, layer)
        if len(nodes) > 1:
            names = [self.program.nodes[n].name for n in nodes]
            raise ValueError(f"layer {layer!r} is called {len(nodes)} times; name one call site by its node: {names}")
        self.node = nodes[0]
        self.params = params
        self.batch = xs[0].shape[0]
        self.env = forward(self.program, params, xs)
        self.downstream = _downstream(self.program, self.node)

    @property
    def value(self) -> Tensor:
        return self.env[self.node]

    def top(self, a: Tensor) -> Tensor:
        env = list(self.env)
        env[self.node] = a
        batch = a.shape[0]
        for n in self.downstream:
            env[n.index] = run_node(self.program, n, env, batch)
        return env[self.program.output]

    def grad(self, a: Tensor, target: ResolvedTarget, weights: Tensor | None = None) -> Tensor:
        """``d/da sum_i w_i f_top(a)_{t_i}``."""
        return grad_of_selected(lambda _, act: self.top(act), {}, (a,), target, weights)[0]


def _prepare(model_fn: ModelFn, params: Params, x: Any, target: Target, layer: Any, check_finite: bool,
             check_output: bool = True) -> tuple[tuple[Tensor, ...], Params, int, ResolvedTarget]:
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted module path or a graph node name (str), got {type(layer).__name__}")
    xs, params, _, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite,
                                           check_output=check_output)
    return xs, params, batch, t


@forward_args
def activation(model_fn: ModelFn, params: Params, x: Any, layer: str, *, check_finite: bool = True) -> Tensor:
    """The output of ``layer`` for input ``x``, shape as the layer's output.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> x = torch.randn(2, 3)
        >>> torch.equal(ax.layer.activation(model_fn, params, x, "1"), net[1](net[0](x)))
        True
    """
    xs, params, _, _ = _prepare(model_fn, params, x, None, layer, check_finite, check_output=False)  # no target
    with eager_no_grad():
        return _Split(model_fn, params, xs, layer).value


@forward_args
def gradient_x_activation(model_fn: ModelFn, params: Params, x: Any, target: Target, layer: str, *,
                          check_finite: bool = True) -> Tensor:
    r"""Layer activation times the gradient of the target with respect to it: :math:`a \odot \partial f_t/\partial a`."""
    xs, params, _, t = _prepare(model_fn, params, x, target, layer, check_finite)
    with eager_no_grad():
        split = _Split(model_fn, params, xs, layer)
        return split.value * split.grad(split.value, t)


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
_CHANNEL_FIRST_MODULES = re.compile(r"\.(Conv\w*|GroupNorm|BatchNorm\w*|InstanceNorm\w*|\w*Pool\w*)$")
#: ops whose output keeps the layout of their same-rank inputs (elementwise, residual adds, cat, pad)
_SAME_LAYOUT_OPS = frozenset(
    """relu relu6 leaky_relu elu selu celu gelu silu mish sigmoid tanh softplus hardtanh hardswish hardsigmoid prelu
    dropout feature_dropout clone contiguous alias detach _to_copy lift_fresh_copy add sub mul div neg abs clamp
    clamp_min clamp_max maximum minimum where pow square sqrt exp log constant_pad_nd pad getitem cat concat""".split()
)


def _channel_first(program: Program, node: int) -> bool:
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


@forward_args
def grad_cam(model_fn: ModelFn, params: Params, x: Any, target: Target, layer: str, *, channel_dim: int | None = None,
             relu: bool = True, check_finite: bool = True) -> Tensor:
    r"""Grad-CAM [1] at ``layer``: :math:`\mathrm{ReLU}(\sum_c \alpha_c A_c)` with
    :math:`\alpha_c` the mean of :math:`\partial f_t / \partial A_c` over the layer's other
    (spatial or token) dims ([1], eqs. 1-2).

    Grad-CAM needs a channel dim. By default (``channel_dim=None``) it is dim 1 and the layer's
    output must be laid out ``(B, C, *spatial)``: produced by a conv, pooling or batch/group/instance
    norm op, possibly followed by elementwise ops, residual adds or ``cat``. Any other layer, e.g.
    the ``(B, T, D)`` output of a ``Linear`` inside a transformer, raises a ``ValueError`` rather
    than treating tokens as channels; name its channel dim explicitly (``channel_dim=-1`` for
    ``(B, T, D)``: the ``D`` features are weighted and summed, one value per token). An explicit
    ``channel_dim`` is trusted without the layout check.

    Args:
        layer: Dotted module path or graph node name.
        channel_dim: The dim of the layer's output holding the channels (negative counts from the
            end, never 0, the batch); ``None``: 1, checked as above.
        relu: Apply the ReLU of [1]. attrax applies it by default; Captum's ``LayerGradCam``
            defaults to ``relu_attributions=False``: pass ``relu=False`` to match it (Captum's
            ``GuidedGradCam`` applies it, as ``guided_grad_cam`` does).
    Returns:
        The layer's output shape with the channel dim reduced to size 1, at the layer's
        resolution: ``(B, 1, *spatial)`` for ``(B, C, *spatial)``; ``(B, T, 1)`` for a
        ``(B, T, D)`` layer with ``channel_dim=-1``.
    Raises:
        ValueError: If the layer's output has fewer than 3 dims, ``channel_dim`` is out of range or
            the batch dim, or ``channel_dim=None`` and the output is not ``(B, C, *spatial)``.

    References:
        [1] Selvaraju et al. Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
            Localization. ICCV 2017.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> ax.layer.grad_cam(model_fn, params, torch.randn(2, 1, 4, 4), 0, "1").shape
        torch.Size([2, 1, 2, 2])
    """
    if channel_dim is not None and (not isinstance(channel_dim, int) or isinstance(channel_dim, bool)):
        raise TypeError(f"channel_dim must be an int or None, got {type(channel_dim).__name__}")
    xs, params, _, t = _prepare(model_fn, params, x, target, layer, check_finite)
    with eager_no_grad():
        split = _Split(model_fn, params, xs, layer)
        a = split.value
        if a.ndim < 3:
            raise ValueError(f"grad_cam needs a layer with channels and spatial (or token) dims, {layer!r} has output "
                             f"shape {tuple(a.shape)}")
        if channel_dim is None:
            if not _channel_first(split.program, split.node):
                raise ValueError(
                    f"grad_cam needs a channel dim: layer {layer!r} has output shape {tuple(a.shape)} from "
                    f"{split.program.nodes[split.node].describe()}, which is not laid out (B, C, *spatial) like a "
                    f"conv/pooling layer; pass channel_dim= to name the channel dim (e.g. channel_dim=-1 for the "
                    f"(B, T, D) output of a Linear in a transformer, giving a (B, T, 1) map)"
                )
            c = 1
        else:
            c = channel_dim + a.ndim if channel_dim < 0 else channel_dim
            if not 1 <= c < a.ndim:
                raise ValueError(f"channel_dim {channel_dim} is out of range (or the batch dim) for layer {layer!r} "
                                 f"with output shape {tuple(a.shape)}: expected 1 <= channel_dim < {a.ndim} or "
                                 f"-{a.ndim - 1} <= channel_dim <= -1")
        g = split.grad(a, t)
        weights = g.mean(dim=tuple(d for d in range(1, a.ndim) if d != c), keepdim=True)
        cam = (weights * a).sum(c, keepdim=True)
        return cam.clamp(min=0) if relu else cam


@forward_args
def guided_grad_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target, layer: str, *,
                    channel_dim: int | None = None, interpolate_mode: str = "nearest",
                    check_finite: bool = True) -> Tensor:
    """Guided Grad-CAM [1]: guided backprop times the (ReLU'd) Grad-CAM map of ``layer``.

    With channels at dim 1 (``channel_dim`` ``None`` or 1) the ``(B, 1, *spatial)`` map is
    resized to ``x``'s spatial dims (``interpolate_mode``, nearest as Captum); with another
    ``channel_dim`` (see ``grad_cam``) the map must broadcast to ``x``, e.g. the ``(B, T, 1)`` map
    of a transformer layer against ``(B, T, D)`` embeddings.

    Returns:
        Attributions with the shape of ``x``.
    Raises:
        ValueError: As ``grad_cam``, or if the map neither resizes nor broadcasts to ``x``.
    References:
        [1] Selvaraju et al. Grad-CAM. ICCV 2017.
    """
    from .deeplift import guided_backprop

    cam = grad_cam(model_fn, params, x, target, layer, channel_dim=channel_dim, check_finite=check_finite)
    guided = guided_backprop(model_fn, params, x, target, check_finite=check_finite)
    if (channel_dim is None or channel_dim % cam.ndim == 1) and cam.ndim == guided.ndim:
        return guided * torch.nn.functional.interpolate(cam, size=guided.shape[2:], mode=interpolate_mode)
    try:
        fits = torch.broadcast_shapes(cam.shape, guided.shape) == guided.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"the Grad-CAM map of layer {layer!r} has shape {tuple(cam.shape)}, which neither resizes "
                         f"(channels at dim 1, as many dims as x) nor broadcasts to x of shape {tuple(guided.shape)}")
    return guided * cam


@forward_args
def integrated_gradients(
    model_fn: ModelFn,
    params: Params,
    x: Any,
    target: Target,
    layer: str,
    *,
    baseline: Any = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> Tensor:
    r"""Layer integrated gradients: IG of :math:`f_{\text{top}}` along the straight path between the
    layer activations :math:`a' = L(x')` and :math:`a = L(x)`.

    :math:`(a - a') \odot \int_0^1 \nabla f_{\text{top}}(a' + \alpha(a - a'))\,d\alpha`, so the
    attributions sum to :math:`f_{\text{top}}(a) - f_{\text{top}}(a')`, i.e. :math:`f(x) - f(x')`
    when every path from the input to the output passes through the layer.

    Args:
        baseline: Reference input :math:`x'` (zeros when ``None``), as for ``ax.integrated_gradients``.
        n_steps, method, chunk_size: As for ``ax.integrated_gradients`` (steps are vmapped, since
            ``f_top`` may mix the layer with values that bypass it).
    Returns:
        Attributions shaped like the layer's output.
    """
    xs, params, batch, t = _prepare(model_fn, params, x, target, layer, check_finite)
    check_quadrature(method, n_steps)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    bs = baselines_for(baseline, xs)
    alphas, weights = quadrature(method, n_steps)
    with eager_no_grad():
        split = _Split(model_fn, params, xs, layer)
        a_x = split.value
        a_b = _Split(model_fn, params, bs, layer).value
        diff = a_x - a_b
        total = torch.zeros_like(a_x)
        for lo, hi in chunks(n_steps, chunk_size):
            al = torch.tensor(alphas[lo:hi], dtype=a_x.dtype, device=a_x.device)
            w = torch.tensor(weights[lo:hi], dtype=a_x.dtype, device=a_x.device)

            def one(alpha: Tensor, weight: Tensor) -> Tensor:
                return split.grad(a_b + alpha * diff, t) * weight

            total = total + torch.func.vmap(one)(al, w).sum(0)
        return total * diff


@forward_args
def conductance(
    model_fn: ModelFn,
    params: Params,
    x: Any,
    target: Target,
    layer: str,
    *,
    baseline: Any = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> Tensor:
    r"""Layer conductance [1]: the flow of IG through each unit of the layer.

    Along the input path :math:`x(\alpha) = x' + \alpha(x - x')`, unit :math:`j` gets
    :math:`\int_0^1 \frac{\partial f}{\partial a_j}(x(\alpha))\, \frac{d a_j(x(\alpha))}{d\alpha}\, d\alpha`
    with the exact path derivative (a forward-mode product), so the units' conductances sum to
    :math:`f(x) - f(x')` for a layer every path passes through, as layer IG does.

    Returns:
        Attributions shaped like the layer's output.
    References:
        [1] Dhamdhere, Sundararajan, Yan. How Important Is a Neuron? ICLR 2019.
    """
    xs, params, batch, t = _prepare(model_fn, params, x, target, layer, check_finite)
    check_quadrature(method, n_steps)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    bs = baselines_for(baseline, xs)
    alphas, weights = quadrature(method, n_steps)
    _load_jvp_decompositions()
    with eager_no_grad():
        diffs = tuple(xi - b for xi, b in zip(xs, bs))
        program = program_for(model_fn, params, xs)
        nodes = layer_nodes(program, layer)
        if len(nodes) > 1:
            raise ValueError(f"layer {layer!r} is called {len(nodes)} times; name one call site by its node")
        node = nodes[0]

        def layer_of(*inputs: Tensor) -> Tensor:
            return forward(program, params, inputs)[node]

        total: Tensor | None = None
        for lo, hi in chunks(n_steps, chunk_size):
            al = torch.tensor(alphas[lo:hi], dtype=xs[0].dtype, device=xs[0].device)
            w = torch.tensor(weights[lo:hi], dtype=xs[0].dtype, device=xs[0].device)

            def one(alpha: Tensor, weight: Tensor) -> Tensor:
                points = tuple(b + alpha * d for b, d in zip(bs, diffs))
                a, da = torch.func.jvp(layer_of, points, diffs)
                split = _Split(model_fn, params, points, str(program.nodes[node].name))
                return split.grad(a, t) * da * weight

            part = torch.func.vmap(one)(al, w).sum(0)
            total = part if total is None else total + part
        assert total is not None
        return total


def _downstream(program: Program, node: int) -> list[Any]:
    below = {node}
    for n in program.nodes:
        if n.index not in below and any(r in below for r in n.refs):
            below.add(n.index)
    return [n for n in program.nodes if n.index in below and n.index != node]


def _load_jvp_decompositions() -> None:
    """Forward-mode AD loads TorchScript decompositions once, which warns on recent torch; load quietly."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401
