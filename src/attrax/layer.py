r"""Layer attribution: activations, Grad-CAM, layer IG, conductance, gradient x activation.

The layer is named by a dotted module path or a graph node name and found in the traced graph
(no hooks). The graph is split there: :math:`f = f_{\text{top}} \circ L`, where
:math:`f_{\text{top}}(a)` recomputes only the nodes downstream of the layer from a given activation
``a`` (everything else, e.g. a skip connection that bypasses the layer, keeps its value at ``x``).
Gradients with respect to the layer are gradients of :math:`f_{\text{top}}`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target
from .conditional import layer_nodes
from .core import (FunctionalModel, baselines_for, check_positive_int, chunks, eager_no_grad, forward_args,
                   inside_transform)
from .gradients import (
    call_baseline,
    check_flag,
    check_quadrature,
    convergence_delta,
    grad_of_selected,
    progress_bar,
    quadrature,
)
from .rewrite import Program, forward, program_for, program_spec, run_node, trace_program
from .rules.graph import channel_first
from .targets import ResolvedTarget, prepare_call, repeat_target, select

__all__ = ["activation", "conductance", "grad_cam", "gradient_x_activation", "guided_grad_cam", "integrated_gradients"]


@dataclass(frozen=True)
class _Site:
    """Where a layer is cut: ``node``'s value is replaced, for every consumer (the layer's output)
    or, when ``readers`` is given, only for the nodes of the layer's call (its input: a
    skip connection around the layer keeps the value at ``x``, as Captum's pre-hook)."""

    node: int
    readers: frozenset[int] | None = None


def layer_site(program: Program, layer: str, to_input: bool = False) -> _Site:
    """The cut for ``layer``'s output, or with ``to_input`` for its input (one input tensor)."""
    nodes = layer_nodes(program, layer)
    if len(nodes) > 1:
        names = [program.nodes[n].name for n in nodes]
        raise ValueError(f"layer {layer!r} is called {len(nodes)} times; name one call site by its node: {names}")
    node = nodes[0]
    if not to_input:
        return _Site(node)
    call = _call_nodes(program, layer, node)
    inputs = sorted({r for i in call for r, d in zip(program.nodes[i].refs, program.nodes[i].dep_refs)
                     if d and r not in call})
    if len(inputs) != 1:
        raise ValueError(f"attribute_to_layer_input needs a layer with one input computed from x; layer {layer!r} has "
                         f"{len(inputs)} ({[program.nodes[r].name for r in inputs]})")
    return _Site(inputs[0], frozenset(call))


def _call_nodes(program: Program, layer: str, node: int) -> set[int]:
    """The nodes of the call of ``layer`` whose last node is ``node`` (just ``node`` for a node name)."""
    last = program.nodes[node]
    keys = [key for key, path in last.stack if path == layer]
    if not keys:
        return {node}
    return {n.index for n in program.nodes if (keys[-1], layer) in n.stack}


class _Split:
    """A program split at the sites of one or more layers: the forward at ``x``, and ``f_top``
    recomputing from given values at the sites only the nodes downstream of them."""

    def __init__(self, model_fn: ModelFn, params: Params, xs: tuple[Tensor, ...], layers: str | Sequence[str],
                 to_input: bool = False, attribute: bool = True, env: list[Any] | None = None, *,
                 program: Program | None = None, keep: str = "all") -> None:
        """``env``: the program's values at ``xs`` when the caller has them already; ``program``: the
        program for ``xs`` when the caller has it. ``keep``: which values the forward computes:
        ``"all"``; ``"top"`` those ``f_top`` reads (and the sites' values); ``"sites"`` the sites' values
        (no ``output``)."""
        self.program: Program = program_for(model_fn, params, xs) if program is None else program
        names = [layers] if isinstance(layers, str) else list(layers)
        self.sites = [layer_site(self.program, layer, to_input) for layer in names]
        self.node = self.sites[0].node
        self.params = params
        self.batch = xs[0].shape[0]
        self.downstream = _downstream_of(self.program, self.sites)
        if env is None:
            wanted = None if keep == "all" else {s.node for s in self.sites} | (
                _reads(self.downstream, self.sites) if keep == "top" else set())
            env = forward(self.program, params, xs) if wanted is None else _forward_to(self.program, params, xs,
                                                                                        wanted)
        self.env = env
        if len(self.sites) > 1:
            _check_reach(self.program, names, self.sites)
        for name, site in zip(names, self.sites):
            value = self.env[site.node]
            if attribute and not (isinstance(value, Tensor) and value.is_floating_point()):
                what = "input" if to_input else "output"
                got = f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"layer {name!r} has a {what} of {got}, not a floating point tensor (e.g. token ids), "
                                 f"so nothing can be attributed to it" + ("; attribute to its output instead "
                                 "(attribute_to_layer_input=False)" if to_input else ""))

    @property
    def value(self) -> Tensor:
        return self.env[self.node]

    @property
    def values(self) -> tuple[Tensor, ...]:
        return tuple(self.env[s.node] for s in self.sites)

    @property
    def output(self) -> Tensor:
        return self.env[self.program.output]

    def top(self, *values: Tensor) -> Tensor:
        env = list(self.env)
        for s, a in zip(self.sites, values):
            if s.readers is None:
                env[s.node] = a
        cut = [(s, a) for s, a in zip(self.sites, values) if s.readers is not None]
        base = {s.node: env[s.node] for s, _ in cut}
        batch = values[0].shape[0]
        for n in self.downstream:
            for s, a in cut:
                env[s.node] = a if n.index in s.readers else base[s.node]
            env[n.index] = run_node(self.program, n, env, batch)
            if n.index in base:
                base[n.index] = env[n.index]
        return env[self.program.output]

    def grads(self, values: tuple[Tensor, ...], target: ResolvedTarget, weights: Tensor | None = None
              ) -> tuple[Tensor, ...]:
        """``d/da_j sum_i w_i f_top(a)_{t_i}`` for every site ``j``."""
        return grad_of_selected(lambda _, *acts: self.top(*acts), {}, values, target, weights)

    def grad(self, a: Tensor, target: ResolvedTarget, weights: Tensor | None = None) -> Tensor:
        """``d/da sum_i w_i f_top(a)_{t_i}`` (one site)."""
        return self.grads((a,), target, weights)[0]


def _reads(downstream: Sequence[Any], sites: Sequence[_Site]) -> set[int]:
    """The nodes ``f_top`` reads that it does not recompute (a replaced output is given, not read)."""
    below = {n.index for n in downstream}
    return {r for n in downstream for r in n.refs if r not in below} - {s.node for s in sites if s.readers is None}


def _forward_to(program: Program, params: Params, xs: Sequence[Tensor], wanted: set[int]) -> list[Any]:
    """The program's values at ``xs`` of the nodes in ``wanted`` and of those they are computed from
    (as ``forward``, which computes all); the others are None."""
    need = set(wanted)
    for n in reversed(program.nodes):
        if n.index in need:
            need.update(n.refs)
    return forward(program, params, xs, only=need)


class _Folded:
    r"""``f_top`` of a :class:`_Split` at ``k * B`` rows, for ``k`` copies of the batch folded into it
    (copies outermost, as ``ax.integrated_gradients`` folds its steps): the nodes downstream of the
    sites run as in the program traced at ``k * B`` rows, from folded values at the sites; every value
    they read that bypasses the layer (the residual stream, position embeddings, masks,
    additional_forward_args) is the split's own value at ``x``, repeated ``k`` times where the traces
    at ``B`` and ``k * B`` rows show one row per sample (dim 0 grows ``k``-fold), unchanged where
    its shape does not depend on the batch; constants are the ``k * B`` program's own. One batched
    forward and backward instead of vmapped ones (whose attention backward, among others, has no
    batching rule and loops per step)."""

    def __init__(self, program: Program, downstream: list[Any], sites: Sequence[_Site], copies: int, rows: int,
                 plan: list[tuple[int, str]], drops: list[list[int]]) -> None:
        self.program, self.downstream, self.sites, self.plan, self.drops = program, downstream, sites, plan, drops
        self.copies, self.rows = copies, rows

    @staticmethod
    def plan(split: _Split, program: Program, k: int) -> _Folded | None:
        """``split``'s ``f_top`` at ``k`` copies, ``program`` being its program traced at ``k * B``
        rows; None where the two traces do not show that folding is exact (the graph changes with
        the batch size, or a value read around the layer is not laid out batch first)."""
        base = split.program
        if program.batch is None or base.batch is None or len(program.nodes) != len(base.nodes) or (
                program.output != base.output):
            return None
        for n, m in zip(program.nodes, base.nodes):
            if (n.op, n.target, n.refs) != (m.op, m.target, m.refs):
                return None
        plan: list[tuple[int, str]] = []
        for i in sorted(_reads(split.downstream, split.sites) | {s.node for s in split.sites}):
            n, m = program.nodes[i], base.nodes[i]
            if n.op in ("const", "param"):
                plan.append((i, n.op))
                continue
            if n.shape is None or m.shape is None or len(n.shape) != len(m.shape):
                return None  # not a tensor (or its shape unknown)
            if n.shape == m.shape:
                plan.append((i, "same"))
            elif n.shape and n.shape[1:] == m.shape[1:] and n.shape[0] == m.shape[0] * k:
                plan.append((i, "repeat"))
            else:
                return None
        downstream = [program.nodes[n.index] for n in split.downstream]
        # each value is released after its last reader (autograd keeps what the backward needs): the
        # k-fold intermediates are not all alive at once
        last: dict[int, int] = {}
        for pos, n in enumerate(downstream):
            for r in n.refs:
                last[r] = pos
        keep = {program.output} | {s.node for s in split.sites}
        drops: list[list[int]] = [[] for _ in downstream]
        for r, pos in last.items():
            if r not in keep:
                drops[pos].append(r)
        return _Folded(program, downstream, split.sites, k, k * split.batch, plan, drops)

    def top(self, env_x: Sequence[Any], *values: Tensor) -> Tensor:
        env: list[Any] = [None] * len(self.program.nodes)
        for i, how in self.plan:
            if how == "const":
                env[i] = self.program.constants[int(self.program.nodes[i].target)]
            elif how == "repeat":
                env[i] = env_x[i].repeat(self.copies, *([1] * (env_x[i].ndim - 1)))
            else:
                env[i] = env_x[i]
        for s, a in zip(self.sites, values):
            if s.readers is None:
                env[s.node] = a
        cut = [(s, a) for s, a in zip(self.sites, values) if s.readers is not None]
        base = {s.node: env[s.node] for s, _ in cut}
        for n, drop in zip(self.downstream, self.drops):
            for s, a in cut:
                env[s.node] = a if n.index in s.readers else base[s.node]
            env[n.index] = run_node(self.program, n, env, self.rows)
            if n.index in base:
                base[n.index] = env[n.index]
            for r in drop:
                env[r] = None
        return env[self.program.output]

    def grads(self, env_x: Sequence[Any], values: tuple[Tensor, ...], target: ResolvedTarget, weights: Tensor
              ) -> tuple[Tensor, ...]:
        """As :meth:`_Split.grads` for the folded values; ``env_x``: the split's values at ``x``."""
        return grad_of_selected(lambda _, *acts: self.top(env_x, *acts), {}, values, target, weights)


def _fold_steps(model_fn: ModelFn, params: Params, xs: tuple[Tensor, ...], layer: Any, to_input: bool,
                spans: Any, full: bool) -> tuple[_Split, dict[int, _Folded] | None]:
    """The split at ``x`` and, where exact, its ``f_top`` folded for each chunk's number of steps.

    Folded, ``f_top`` runs the program that keeps attention as one op (its fused kernels' own
    backward; a vmapped one has no batching rule); otherwise (the graph changes with the batch size,
    under torch.func transforms or torch.compile) the steps are vmapped over the plain program."""
    keep = "all" if full else "top"
    if torch.compiler.is_compiling() or inside_transform():
        return _Split(model_fn, params, xs, layer, to_input, keep=keep), None
    spec, batch = program_spec(model_fn, params, xs)
    fingerprint = model_fn.fingerprint() if isinstance(model_fn, FunctionalModel) else None
    program = trace_program(model_fn, spec, batch, fingerprint, fused_attention=True)
    split = _Split(model_fn, params, xs, layer, to_input, program=program, keep=keep)
    folds: dict[int, _Folded] = {}
    for lo, hi in spans:
        k = hi - lo
        if k not in folds:
            fold = _Folded.plan(split, trace_program(model_fn, spec, k * batch, fingerprint, fused_attention=True), k)
            if fold is None:
                return _Split(model_fn, params, xs, layer, to_input, keep=keep), None
            folds[k] = fold
    return split, folds


def _downstream_of(program: Program, sites: Sequence[_Site]) -> list[Any]:
    """The nodes to recompute from values at ``sites``: everything below a replaced output, or below
    the layer's own readers of a replaced input; never a replaced output itself."""
    starts = {s.node for s in sites if s.readers is None}
    for s in sites:
        if s.readers is not None:
            starts |= {r for r in s.readers if s.node in program.nodes[r].refs}
    below = set(starts)
    for n in program.nodes:
        if n.index not in below and any(r in below for r in n.refs):
            below.add(n.index)
    replaced = {s.node for s in sites if s.readers is None}
    return [n for n in program.nodes if n.index in below and n.index not in replaced]


def _check_reach(program: Program, names: Sequence[str], sites: Sequence[_Site]) -> None:
    """With several layers replaced at once, each must still reach the output around the others
    (Captum fails there with "appears to not have been used in the graph")."""
    for name, site in zip(names, sites):
        others = [s for s in sites if s is not site]
        blocked = {s.node for s in others if s.readers is None}
        if site.node in blocked or any(s.node == site.node and s.readers == site.readers for s in others):
            raise ValueError(f"layer {name!r} is listed twice (or shares its node with another listed layer)")
        below = _downstream_of(program, [site])
        reach = {site.node} if site.readers is None else set()
        for n in below:
            if n.index in blocked:
                continue
            if any(r in reach for r in n.refs) or (site.readers is not None and n.index in site.readers
                                                   and site.node in n.refs):
                reach.add(n.index)
        if program.output not in reach:
            cut = [n for n, s in zip(names, sites) if s is not site and s.readers is None]
            raise ValueError(f"layer {name!r} reaches the output only through the other listed layers {cut}, whose "
                             f"values replace its effect: its attribution would be zero. Attribute to it in a "
                             f"separate call")


def _prepare(model_fn: ModelFn, params: Params, x: Any, target: Target, layer: Any, check_finite: bool,
             check_output: bool = True, integer_inputs: bool = True, many: bool = False,
             ) -> tuple[tuple[Tensor, ...], Params, int, ResolvedTarget, bool]:
    layers = list(layer) if many and isinstance(layer, (list, tuple)) else [layer]
    if not layers or not all(isinstance(name, str) for name in layers):
        what = "a dotted module path or graph node name (str)" + (", or a list of them" if many else "")
        raise TypeError(f"layer must be {what}, got {type(layer).__name__}")
    xs, params, is_tuple, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite,
                                                  check_output=check_output, integer_inputs=integer_inputs)
    return xs, params, batch, t, is_tuple


def _baselines(baseline: Any, xs: tuple[Tensor, ...], is_tuple: bool) -> tuple[Tensor, ...]:
    """Baselines in input space; a callable is called on ``x``. For integer inputs (token ids) the
    baseline must be ids too: ``None`` (id 0), an int or an integer tensor."""
    baseline = call_baseline(baseline, xs, is_tuple)
    parts = baseline if isinstance(baseline, (tuple, list)) and len(xs) > 1 else [baseline] * len(xs)
    for i, (b, xi) in enumerate(zip(parts, xs)):
        if xi.is_floating_point() or b is None:
            continue
        ok = (isinstance(b, numbers.Integral) and not isinstance(b, bool)) or (
            isinstance(b, Tensor) and not b.is_floating_point() and not b.is_complex())
        if not ok:
            label = "baseline" if len(xs) == 1 else f"baseline[{i}]"
            raise TypeError(f"{label} must be ids like x (dtype {xi.dtype}): None (id 0), an int or an integer tensor, "
                            f"got {type(b).__name__}{f' of dtype {b.dtype}' if isinstance(b, Tensor) else f' {b!r}'}")
    return baselines_for(baseline, xs)


@forward_args
def activation(model_fn: ModelFn, params: Params, x: Any, layer: str, *, attribute_to_layer_input: bool = False,
               check_finite: bool = True) -> Tensor:
    """The output of ``layer`` for input ``x``, shape as the layer's output (its input with
    ``attribute_to_layer_input=True``, as Captum's ``LayerActivation``). ``x`` may hold integer
    tensors (token ids), as for every layer method but ``conductance``.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> x = torch.randn(2, 3)
        >>> torch.equal(ax.layer.activation(model_fn, params, x, "1"), net[1](net[0](x)))
        True
    """
    to_input = check_flag(attribute_to_layer_input, "attribute_to_layer_input")
    xs, params, _, _, _ = _prepare(model_fn, params, x, None, layer, check_finite, check_output=False)  # no target
    with eager_no_grad():
        return _Split(model_fn, params, xs, layer, to_input, attribute=False).value


@forward_args
def gradient_x_activation(model_fn: ModelFn, params: Params, x: Any, target: Target, layer: str, *,
                          attribute_to_layer_input: bool = False, check_finite: bool = True) -> Tensor:
    r"""Layer activation times the gradient of the target with respect to it: :math:`a \odot \partial f_t/\partial a`.

    With ``attribute_to_layer_input`` :math:`a` is the layer's input as its call sees it (a skip
    connection around the layer keeps its value), as Captum's ``LayerGradientXActivation``."""
    to_input = check_flag(attribute_to_layer_input, "attribute_to_layer_input")
    xs, params, _, t, _ = _prepare(model_fn, params, x, target, layer, check_finite)
    with eager_no_grad():
        split = _Split(model_fn, params, xs, layer, to_input)
        return split.value * split.grad(split.value, t)


@forward_args
def grad_cam(model_fn: ModelFn, params: Params, x: Any, target: Target, layer: str, *, channel_dim: int | None = None,
             relu: bool = True, attribute_to_layer_input: bool = False, check_finite: bool = True) -> Tensor:
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
        attribute_to_layer_input: Use the layer's input (as its call sees it) for :math:`A`,
            as Captum's ``attribute_to_layer_input``; the layout check then applies to that input.
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
    to_input = check_flag(attribute_to_layer_input, "attribute_to_layer_input")
    xs, params, _, t, _ = _prepare(model_fn, params, x, target, layer, check_finite)
    with eager_no_grad():
        split = _Split(model_fn, params, xs, layer, to_input)
        a = split.value
        if a.ndim < 3:
            raise ValueError(f"grad_cam needs a layer with channels and spatial (or token) dims, {layer!r} has output "
                             f"shape {tuple(a.shape)}")
        if channel_dim is None:
            if not channel_first(split.program, split.node):
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
    layer: str | Sequence[str],
    *,
    baseline: Any = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    chunk_size: int | None = None,
    check_finite: bool = True,
    attribute_to_layer_input: bool = False,
    return_convergence_delta: bool = False,
    progress: bool = False,
) -> Any:
    r"""Layer integrated gradients: IG of :math:`f_{\text{top}}` along the straight path between the
    layer activations :math:`a' = L(x')` and :math:`a = L(x)`.

    :math:`(a - a') \odot \int_0^1 \nabla f_{\text{top}}(a' + \alpha(a - a'))\,d\alpha`, so the
    attributions sum to :math:`f_{\text{top}}(a) - f_{\text{top}}(a')`, i.e. :math:`f(x) - f(x')`
    when every path from the input to the output passes through the layer.

    ``x`` may be integer token ids (Captum's NLP recipe): the path then runs between the
    embeddings of the baseline ids and of ``x`` at an embedding layer (``baseline``: ids too,
    ``None`` meaning id 0).

    Args:
        layer: A dotted module path or graph node name, or a list of them: all listed layers
            are then interpolated together, from one forward at ``x`` and one at ``x'``
            (Captum's list of layers: each replaced by its own path, e.g. word and position
            embeddings), and a list of attributions comes back; they sum to
            :math:`f(x) - f(x')` together when every path passes through one of the layers.
        baseline: Reference input :math:`x'` (zeros when ``None``), as for ``ax.integrated_gradients``,
            or a callable ``baseline(x)``.
        n_steps, method, chunk_size: As for ``ax.integrated_gradients``: the steps are folded into
            the batch (``chunk_size * B`` rows per evaluation of :math:`f_{\text{top}}`, the values
            that bypass the layer repeated per step), or vmapped where folding is not shown exact
            (a graph that changes with the batch size; under ``torch.func`` transforms or
            ``torch.compile``).
        attribute_to_layer_input: Attribute to the layer's input as its call sees it (a skip
            connection around the layer keeps its value at ``x``), as Captum.
        return_convergence_delta: Also return :math:`\sum a - (f_t(x) - f_t(x'))` per sample, ``(B,)``
            (from the two forwards the method makes anyway).
        progress: Show a tqdm progress bar over the steps.
    Returns:
        Attributions shaped like the layer's output (input), a list for a list of layers;
        ``(attributions, delta)`` with ``return_convergence_delta``.
    """
    to_input = check_flag(attribute_to_layer_input, "attribute_to_layer_input")
    want_delta = check_flag(return_convergence_delta, "return_convergence_delta")
    if to_input and isinstance(layer, (list, tuple)) and len(layer) > 1:
        # inputs of several layers can be one node (shared) or lie on each other's paths: the joint split
        # then attributes nothing to one of them (found in review); refused rather than silently zero
        raise ValueError("attribute_to_layer_input=True takes one layer at a time; got a list of "
                         f"{len(layer)} layers: call layer.integrated_gradients once per layer")
    xs, params, batch, t, is_tuple = _prepare(model_fn, params, x, target, layer, check_finite, many=True)
    check_quadrature(method, n_steps)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    bs = _baselines(baseline, xs, is_tuple)
    alphas, weights = quadrature(method, n_steps)
    with eager_no_grad():
        split, folds = _fold_steps(model_fn, params, xs, layer, to_input, chunks(n_steps, chunk_size), want_delta)
        bs_program = split.program if program_spec(model_fn, params, bs) == program_spec(model_fn, params, xs) else None
        at_b = _Split(model_fn, params, bs, layer, to_input, program=bs_program, keep="all" if want_delta else "sites")
        a_x, a_b = split.values, at_b.values
        diffs = tuple(ax_ - ab for ax_, ab in zip(a_x, a_b))
        totals = [torch.zeros_like(a) for a in a_x]
        with progress_bar(progress, n_steps, "Layer Integrated Gradients", "step") as bar:
            for lo, hi in chunks(n_steps, chunk_size):
                al = torch.tensor(alphas[lo:hi], dtype=a_x[0].dtype, device=a_x[0].device)
                w = torch.tensor(weights[lo:hi], dtype=a_x[0].dtype, device=a_x[0].device)
                k = hi - lo
                if folds is not None:  # steps folded into the batch: one batched forward and backward
                    points = tuple((ab.unsqueeze(0) + al.view(k, *([1] * ab.ndim)).to(ab.dtype) * d.unsqueeze(0))
                                   .reshape(k * ab.shape[0], *ab.shape[1:]) for ab, d in zip(a_b, diffs))
                    grads = folds[k].grads(split.env, points, repeat_target(t, k), w.repeat_interleave(batch))
                    totals = [tot + g.reshape(k, *a.shape).sum(0) for tot, g, a in zip(totals, grads, a_x)]
                else:
                    def one(alpha: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
                        points = tuple(ab + alpha.to(ab.dtype) * d for ab, d in zip(a_b, diffs))
                        return tuple(g * weight.to(g.dtype) for g in split.grads(points, t))

                    # (randomness: a model left in training mode draws its dropout per step, as separate calls would)
                    steps = torch.func.vmap(one, randomness="different")(al, w)
                    totals = [tot + g.sum(0) for tot, g in zip(totals, steps)]
                bar.update(k)
        attrs = [tot * d for tot, d in zip(totals, diffs)]
        if want_delta:
            span = select(split.output, t) - select(at_b.output, t)
            total = sum(a.reshape(batch, -1).sum(1) for a in attrs)
            delta = total - span.to(total.dtype)
    result = attrs if isinstance(layer, (list, tuple)) else attrs[0]
    return (result, delta) if want_delta else result


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
    attribute_to_layer_input: bool = False,
    return_convergence_delta: bool = False,
    progress: bool = False,
) -> Any:
    r"""Layer conductance [1]: the flow of IG through each unit of the layer.

    Along the input path :math:`x(\alpha) = x' + \alpha(x - x')`, unit :math:`j` gets
    :math:`\int_0^1 \frac{\partial f}{\partial a_j}(x(\alpha))\, \frac{d a_j(x(\alpha))}{d\alpha}\, d\alpha`
    with the exact path derivative (a forward-mode product), so the units' conductances sum to
    :math:`f(x) - f(x')` for a layer every path passes through, as layer IG does.

    Args:
        baseline: Reference input :math:`x'` (zeros when ``None``), or a callable ``baseline(x)``.
        attribute_to_layer_input: Conductance of the layer's input units as its call sees them.
        return_convergence_delta: Also return :math:`\sum a - (f_t(x) - f_t(x'))` per sample,
            ``(B,)``, as Captum's ``LayerConductance`` (two more forwards).
        progress: Show a tqdm progress bar over the steps.
    Returns:
        Attributions shaped like the layer's output (input); ``(attributions, delta)`` with
        ``return_convergence_delta``.
    Raises:
        TypeError: For integer inputs: the path runs through ``x`` itself (use layer IG for ids).
    References:
        [1] Dhamdhere, Sundararajan, Yan. How Important Is a Neuron? ICLR 2019.
    """
    to_input = check_flag(attribute_to_layer_input, "attribute_to_layer_input")
    want_delta = check_flag(return_convergence_delta, "return_convergence_delta")
    _refuse_integer_inputs(x, "conductance")
    xs, params, batch, t, is_tuple = _prepare(model_fn, params, x, target, layer, check_finite, integer_inputs=False)
    check_quadrature(method, n_steps)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    bs = _baselines(baseline, xs, is_tuple)
    alphas, weights = quadrature(method, n_steps)
    _load_jvp_decompositions()
    with eager_no_grad():
        diffs = tuple(xi - b for xi, b in zip(xs, bs))
        program = program_for(model_fn, params, xs)
        node = layer_site(program, layer, to_input).node

        def layer_of(*inputs: Tensor) -> tuple[Tensor, list[Any]]:
            env = forward(program, params, inputs)
            return env[node], env

        total: Tensor | None = None
        with progress_bar(progress, n_steps, "Layer Conductance", "step") as bar:
            for lo, hi in chunks(n_steps, chunk_size):
                al = torch.tensor(alphas[lo:hi], dtype=xs[0].dtype, device=xs[0].device)
                w = torch.tensor(weights[lo:hi], dtype=xs[0].dtype, device=xs[0].device)

                def one(alpha: Tensor, weight: Tensor) -> Tensor:
                    points = tuple(b + alpha * d for b, d in zip(bs, diffs))
                    a, da, env = torch.func.jvp(layer_of, points, diffs, has_aux=True)
                    split = _Split(model_fn, params, points, layer, to_input, env=env)  # one forward per step
                    return split.grad(a, t) * da * weight

                part = torch.func.vmap(one, randomness="different")(al, w).sum(0)  # (training-mode dropout: per step)
                total = part if total is None else total + part
                bar.update(hi - lo)
        assert total is not None
    if want_delta:
        return total, convergence_delta(model_fn, params, xs, bs, t, (total,))
    return total


def _refuse_integer_inputs(x: Any, method: str) -> None:
    xs = x if isinstance(x, (tuple, list)) else (x,)
    for t in xs:
        if isinstance(t, Tensor) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool:
            raise TypeError(f"{method} interpolates x itself, which needs floating point inputs; x has dtype {t.dtype} "
                            f"(token ids?): use ax.layer.integrated_gradients, which interpolates at the layer "
                            f"(e.g. between the embeddings of the baseline ids and of x)")


def _load_jvp_decompositions() -> None:
    """Forward-mode AD loads TorchScript decompositions once, which warns on recent torch; load quietly."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401
