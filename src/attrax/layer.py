r"""Layer attribution: activations, Grad-CAM, layer IG, conductance, gradient x activation.

The layer is named by a dotted module path or a graph node name and found in the traced graph
(no hooks). The graph is split there: :math:`f = f_{\text{top}} \circ L`, where
:math:`f_{\text{top}}(a)` recomputes only the nodes downstream of the layer from a given activation
``a`` (everything else, e.g. a skip connection that bypasses the layer, keeps its value at ``x``).
Gradients with respect to the layer are gradients of :math:`f_{\text{top}}`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target
from .conditional import layer_nodes
from .core import baselines_for, check_positive_int, chunks, eager_no_grad
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


def _prepare(model_fn: ModelFn, params: Params, x: Any, target: Target, layer: Any, check_finite: bool
             ) -> tuple[tuple[Tensor, ...], Params, int, ResolvedTarget]:
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted module path or a graph node name (str), got {type(layer).__name__}")
    xs, params, _, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite)
    return xs, params, batch, t


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
    xs, params, _, _ = _prepare(model_fn, params, x, None, layer, check_finite)
    with eager_no_grad():
        return _Split(model_fn, params, xs, layer).value


def gradient_x_activation(model_fn: ModelFn, params: Params, x: Any, target: Target, layer: str, *,
                          check_finite: bool = True) -> Tensor:
    r"""Layer activation times the gradient of the target with respect to it: :math:`a \odot \partial f_t/\partial a`."""
    xs, params, _, t = _prepare(model_fn, params, x, target, layer, check_finite)
    with eager_no_grad():
        split = _Split(model_fn, params, xs, layer)
        return split.value * split.grad(split.value, t)


def grad_cam(model_fn: ModelFn, params: Params, x: Any, target: Target, layer: str, *, relu: bool = True,
             check_finite: bool = True) -> Tensor:
    r"""Grad-CAM [1] at ``layer``: :math:`\mathrm{ReLU}(\sum_c \alpha_c A_c)` with
    :math:`\alpha_c` the spatial mean of :math:`\partial f_t / \partial A_c`.

    Returns ``(B, 1, *spatial)`` at the layer's resolution. ``relu=False`` keeps negative values
    (Captum's ``LayerGradCam`` default).

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
    xs, params, _, t = _prepare(model_fn, params, x, target, layer, check_finite)
    with eager_no_grad():
        split = _Split(model_fn, params, xs, layer)
        a = split.value
        if a.ndim < 3:
            raise ValueError(f"grad_cam needs a layer with spatial dims, {layer!r} has output shape {tuple(a.shape)}")
        g = split.grad(a, t)
        weights = g.mean(dim=tuple(range(2, a.ndim)), keepdim=True)
        cam = (weights * a).sum(1, keepdim=True)
        return cam.clamp(min=0) if relu else cam


def guided_grad_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target, layer: str, *,
                    interpolate_mode: str = "nearest", check_finite: bool = True) -> Tensor:
    """Guided Grad-CAM [1]: guided backprop times Grad-CAM upsampled to the input (nearest, as Captum).

    References:
        [1] Selvaraju et al. Grad-CAM. ICCV 2017.
    """
    from .deeplift import guided_backprop

    cam = grad_cam(model_fn, params, x, target, layer, check_finite=check_finite)
    guided = guided_backprop(model_fn, params, x, target, check_finite=check_finite)
    up = torch.nn.functional.interpolate(cam, size=guided.shape[2:], mode=interpolate_mode)
    return guided * up


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
