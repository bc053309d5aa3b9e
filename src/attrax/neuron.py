r"""Neuron attribution: how each input feature drives one neuron (or a selection) of an inner layer.

Every method here is the attrax method of the same name with the *layer's output* in the place
of the model output: the neuron selector plays the part of the target, and the layer is found in
the traced graph (``conditional.layer_nodes``, as for ``ax.layer``), never by building a truncated
model. Gradient and integrated gradients differentiate the program evaluated only up to the
layer; DeepLift and guided backprop run the rule engine (``rules.run_plan``) with the seed at the
layer's node instead of the output, so only the rules of the layer's ancestors are used (ops
after the layer need none). Conductance combines the gradient of the target with respect to the
layer (``ax.layer``'s split graph) with the neuron's gradient with respect to the input.

Neurons (``neuron=``) are given like targets, on the layer's output ``(B, ...)``:

* a tuple of ints, one per non-batch dim: ``out[:, i, j, k]`` (an int for a ``(B, N)`` layer);
* a tuple holding slices (or fewer ints than dims): the *sum* of the selected block, as Captum;
* a callable ``g(layer_out) -> Tensor[B]``.

With ``attribute_to_neuron_input=True`` the neuron is a unit of the layer's input (one input
tensor computed from ``x``); for conductance the gradient of the target then runs through the
layer's call only (a skip connection around the layer keeps its value), as ``ax.layer`` does.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target, TensorOrTuple
from .core import baselines_for, check_positive_int, chunks, eager_no_grad, forward_args
from .deeplift import _guided_rule, deeplift_rule, seed
from .gradients import (
    _check_delta_flags,
    call_baseline,
    check_flag,
    check_quadrature,
    grad_of_selected,
    progress_bar,
    quadrature,
)
from .layer import _Split, layer_site
from .rewrite import Program, Streams, forward, program_for, substitute
from .rules.deeplift import upcast
from .rules.plan import run_plan
from .targets import ResolvedTarget, prepare_call, select

__all__ = ["conductance", "deeplift", "gradient", "guided_backprop", "integrated_gradients"]


def _takes_neuron(method: Any) -> Any:
    """Mark a method whose fourth argument is a neuron, not a model target (``noise_tunnel`` then
    passes it through unchecked against the model's output)."""
    method.target_is_neuron = True
    return method

Neuron = Any  # int | tuple[int | slice, ...] | Callable[[Tensor], Tensor]


class _Block:
    """The sum of a block of the layer's output, ``out[:, *index].sum()`` per sample (Captum's slices)."""

    def __init__(self, index: tuple[Any, ...]) -> None:
        self.index = index

    def __call__(self, out: Tensor) -> Tensor:
        return out[(slice(None), *self.index)].reshape(out.shape[0], -1).sum(1)


class _Selector:
    """A user's selector callable, checked to return one value per sample."""

    def __init__(self, fn: Any, layer: str) -> None:
        self.fn, self.layer = fn, layer

    def __call__(self, out: Tensor) -> Tensor:
        value = self.fn(out)
        if not (isinstance(value, Tensor) and tuple(value.shape) == (out.shape[0],)):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"a callable neuron must return one value per sample, shape ({out.shape[0]},), from "
                             f"layer {self.layer!r}'s output of shape {tuple(out.shape)}; got {got}")
        return value


def _resolve_neuron(neuron: Any, shape: tuple[int, ...], layer: str, batch: int) -> ResolvedTarget:
    """``neuron`` as a target on the layer's output of shape ``shape`` (errors name ``neuron``)."""
    dims = tuple(shape[1:])
    where = f"layer {layer!r} has output shape {tuple(shape)}"
    if callable(neuron) and not isinstance(neuron, (tuple, Tensor)):
        return ResolvedTarget("callable", _Selector(neuron, layer), batch)
    if isinstance(neuron, numbers.Integral) and not isinstance(neuron, bool):
        if len(dims) != 1:
            raise ValueError(f"neuron is an int, which selects out[:, {neuron}], but {where}; give one index per "
                             f"non-batch dim as a tuple")
        neuron = (int(neuron),)
    if not isinstance(neuron, tuple) or not neuron or not all(
            isinstance(i, slice) or (isinstance(i, numbers.Integral) and not isinstance(i, bool)) for i in neuron):
        raise TypeError(f"neuron must be a tuple of ints (or slices) indexing the layer's non-batch dims, an int for "
                        f"a (B, N) layer, or a callable layer_out -> Tensor[B]; got {neuron!r} ({where})")
    if len(neuron) > len(dims):
        raise ValueError(f"neuron {neuron!r} has {len(neuron)} indices but {where}, with {len(dims)} non-batch dims")
    for pos, (i, n) in enumerate(zip(neuron, dims)):
        if not isinstance(i, slice) and not -n <= i < n:
            raise ValueError(f"neuron {neuron!r} is out of range at position {pos}: {where} (expected {-n} <= index < {n})")
    if len(neuron) == len(dims) and not any(isinstance(i, slice) for i in neuron):
        return ResolvedTarget("index", tuple(int(i) for i in neuron), batch, checked=True)
    return ResolvedTarget("callable", _Block(neuron), batch)


class _Layer:
    """The traced program of ``model_fn`` and the node holding the neuron's layer value."""

    def __init__(self, model_fn: ModelFn, params: Params, xs: tuple[Tensor, ...], layer: Any, to_input: bool,
                 neuron: Any) -> None:
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a dotted module path or a graph node name (str), got {type(layer).__name__}")
        self.program: Program = program_for(model_fn, params, xs)
        self.layer, self.to_input = layer, to_input
        self.node = layer_site(self.program, layer, to_input).node
        self.needed = _ancestors(self.program, self.node)
        shape = self.program.nodes[self.node].shape
        if shape is None:  # not recorded: evaluate once
            with torch.no_grad():
                shape = tuple(self.value(params, xs).shape)
        self.neuron = _resolve_neuron(neuron, tuple(shape), layer, xs[0].shape[0])

    def value(self, params: Params, xs: tuple[Tensor, ...]) -> Tensor:
        """The layer's value at ``xs``, evaluating only the nodes it depends on."""
        env = forward(self.program, params, xs, only=self.needed)
        return self.checked(env[self.node])

    def checked(self, value: Any) -> Tensor:
        if not (isinstance(value, Tensor) and value.is_floating_point()):
            raise ValueError(f"layer {self.layer!r} has a {'input' if self.to_input else 'output'} that is not a "
                             f"floating point tensor (e.g. token ids), so a neuron of it cannot be attributed")
        return value

    def forward(self, params: Params, xs: tuple[Tensor, ...]) -> tuple[Tensor, list[Any]]:
        """The layer's value and every node's value at ``xs`` (one full forward)."""
        env = forward(self.program, params, xs)
        return self.checked(env[self.node]), env

    def fn(self) -> Any:
        return lambda p, *inputs: self.value(p, inputs)

    def rules(self, rule_for: Any, method: str) -> tuple[Any, ...]:
        """The rule plan for the layer's ancestors (ops after the layer need no rule)."""
        return substitute(self.program, lambda prog, node: rule_for(prog, node) if node.index in self.needed
                          else _UNUSED, method)


class _Unused:
    """Stands in for the rule of an op after the layer: the reverse pass starts at the layer and never reaches it."""

    def backward(self, site: Any, g: Any) -> dict[int, Any]:  # pragma: no cover - never called
        raise AssertionError("a node after the neuron's layer received a cotangent")


_UNUSED = _Unused()


def _ancestors(program: Program, node: int) -> set[int]:
    need = {node}
    for n in reversed(program.nodes):
        if n.index in need:
            need.update(n.refs)
    return need


def _start(model_fn: Any, params: Any, x: Any, target: Any, check_finite: bool, check_output: bool = False
           ) -> tuple[tuple[Tensor, ...], Any, bool, int, ResolvedTarget]:
    """``prepare_call``; the neuron is checked later, against the layer's shape (``target`` is the model's)."""
    return prepare_call(model_fn, params, x, target, check_finite=check_finite, check_output=check_output)


def _pack(attrs: tuple[Tensor, ...], is_tuple: bool) -> TensorOrTuple:
    return attrs if is_tuple else attrs[0]


@_takes_neuron
@forward_args
def gradient(model_fn: ModelFn, params: Params, x: TensorOrTuple, neuron: Neuron, layer: str, *,
             attribute_to_neuron_input: bool = False, check_finite: bool = True) -> TensorOrTuple:
    r"""Gradient of one neuron of ``layer`` with respect to the input, :math:`\partial y_j(x)/\partial x`
    (Captum's ``NeuronGradient``).

    Args:
        neuron: Tuple index into the layer's non-batch dims (an int for a ``(B, N)`` layer), a
            tuple with slices (the block's sum), or a callable ``layer_out -> Tensor[B]``.
        layer: Dotted module path or graph node name.
        attribute_to_neuron_input: The neuron is a unit of the layer's input.
    Returns:
        Attributions with the shape, dtype and device of ``x``.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> g = ax.neuron.gradient(model_fn, params, torch.randn(2, 3), (1,), "0")  # d(net[0](x)[:, 1])/dx
        >>> torch.equal(g, params["0.weight"][1].expand(2, 3))
        True
    """
    to_input = check_flag(attribute_to_neuron_input, "attribute_to_neuron_input")
    xs, params, is_tuple, _, _ = _start(model_fn, params, x, None, check_finite)
    site = _Layer(model_fn, params, xs, layer, to_input, neuron)
    with eager_no_grad():
        return _pack(grad_of_selected(site.fn(), params, xs, site.neuron), is_tuple)


@_takes_neuron
@forward_args
def integrated_gradients(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    neuron: Neuron,
    layer: str,
    *,
    baseline: Any = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    chunk_size: int | None = None,
    multiply_by_inputs: bool = True,
    attribute_to_neuron_input: bool = False,
    check_finite: bool = True,
    progress: bool = False,
) -> TensorOrTuple:
    r"""Integrated gradients of one neuron: :math:`(x - x') \odot \int_0^1 \nabla y_j(x' + \alpha(x - x'))\,d\alpha`
    (Captum's ``NeuronIntegratedGradients``); sums to :math:`y_j(x) - y_j(x')`.

    Args:
        neuron, layer, attribute_to_neuron_input: As for :func:`gradient`.
        baseline, n_steps, method, chunk_size, multiply_by_inputs, progress: As for
            ``ax.integrated_gradients`` (``baseline`` may be a callable ``baseline(x)``; the steps of
            a chunk are vmapped).
    Returns:
        Attributions with the shape, dtype and device of ``x``.
    """
    to_input = check_flag(attribute_to_neuron_input, "attribute_to_neuron_input")
    multiply = check_flag(multiply_by_inputs, "multiply_by_inputs")
    xs, params, is_tuple, _, _ = _start(model_fn, params, x, None, check_finite)
    check_quadrature(method, n_steps)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    bs = baselines_for(call_baseline(baseline, xs, is_tuple), xs, check_finite=check_finite)
    site = _Layer(model_fn, params, xs, layer, to_input, neuron)
    fn = site.fn()
    alphas, weights = quadrature(method, n_steps)
    diffs = tuple(xi - b for xi, b in zip(xs, bs))
    with eager_no_grad():
        totals = [torch.zeros_like(xi) for xi in xs]
        with progress_bar(progress, n_steps, "Neuron Integrated Gradients", "step") as bar:
            for lo, hi in chunks(n_steps, chunk_size):
                al = torch.tensor(alphas[lo:hi], dtype=xs[0].dtype, device=xs[0].device)
                w = torch.tensor(weights[lo:hi], dtype=xs[0].dtype, device=xs[0].device)

                def one(alpha: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
                    points = tuple(b + alpha * d for b, d in zip(bs, diffs))
                    return tuple(g * weight for g in grad_of_selected(fn, params, points, site.neuron))

                totals = [tot + g.sum(0) for tot, g in zip(totals, torch.func.vmap(one)(al, w))]
                bar.update(hi - lo)
    return _pack(tuple(tot * d for tot, d in zip(totals, diffs)) if multiply else tuple(totals), is_tuple)


@forward_args
def conductance(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    neuron: Neuron,
    layer: str,
    *,
    target: Target = None,
    baseline: Any = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    chunk_size: int | None = None,
    multiply_by_inputs: bool = True,
    attribute_to_neuron_input: bool = False,
    check_finite: bool = True,
    progress: bool = False,
) -> TensorOrTuple:
    r"""Neuron conductance [1]: the part of the target's IG that flows through one neuron.

    :math:`(x_i - x'_i) \int_0^1 \frac{\partial F}{\partial y_j} \frac{\partial y_j}{\partial x_i}\big(x' + \alpha(x - x')\big)\,d\alpha`
    (eq. 3 of [1]; Captum's ``NeuronConductance``), where :math:`\partial F/\partial y_j` is the
    gradient of the target through the graph below the layer (values bypassing the layer keep
    their value at each path point). Summed over all neurons of a layer that every path passes
    through, it is IG of the target. A callable or sliced neuron selects with weights
    :math:`\partial g/\partial y` (exact for selections and sums of neurons; Captum allows only
    single-neuron selections here).

    Args:
        neuron, layer, attribute_to_neuron_input: As for :func:`gradient`.
        target: Selects the model output whose flow is measured (API.md section 2).
        baseline, n_steps, method, chunk_size, multiply_by_inputs, progress: As for
            ``ax.integrated_gradients``.
    Returns:
        Attributions with the shape, dtype and device of ``x``.
    References:
        [1] Dhamdhere, Sundararajan, Yan. How Important Is a Neuron? ICLR 2019.
    """
    to_input = check_flag(attribute_to_neuron_input, "attribute_to_neuron_input")
    multiply = check_flag(multiply_by_inputs, "multiply_by_inputs")
    xs, params, is_tuple, _, t = _start(model_fn, params, x, target, check_finite, check_output=True)
    check_quadrature(method, n_steps)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    bs = baselines_for(call_baseline(baseline, xs, is_tuple), xs, check_finite=check_finite)
    site = _Layer(model_fn, params, xs, layer, to_input, neuron)
    alphas, weights = quadrature(method, n_steps)
    diffs = tuple(xi - b for xi, b in zip(xs, bs))
    with eager_no_grad():
        totals = [torch.zeros_like(xi) for xi in xs]
        with progress_bar(progress, n_steps, "Neuron Conductance", "step") as bar:
            for lo, hi in chunks(n_steps, chunk_size):
                al = torch.tensor(alphas[lo:hi], dtype=xs[0].dtype, device=xs[0].device)
                w = torch.tensor(weights[lo:hi], dtype=xs[0].dtype, device=xs[0].device)

                def one(alpha: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
                    points = tuple(b + alpha * d for b, d in zip(bs, diffs))
                    y, pullback, env = torch.func.vjp(lambda *inputs: site.forward(params, inputs), *points,
                                                      has_aux=True)
                    through = _Split(model_fn, params, points, layer, to_input, env=env).grad(y, t)  # dF/dy
                    return tuple(g * weight for g in pullback(through * _selection_weights(y, site.neuron)))

                totals = [tot + g.sum(0) for tot, g in zip(totals, torch.func.vmap(one)(al, w))]
                bar.update(hi - lo)
    return _pack(tuple(tot * d for tot, d in zip(totals, diffs)) if multiply else tuple(totals), is_tuple)


def _selection_weights(y: Tensor, neuron: ResolvedTarget) -> Tensor:
    r""":math:`\partial g/\partial y` of the neuron's selection: one-hot for an index."""
    if neuron.kind == "index":
        return seed(y, neuron)
    value, pullback = torch.func.vjp(lambda o: select(o, neuron), y)
    return pullback(torch.ones_like(value))[0]


@_takes_neuron
@forward_args
def deeplift(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    neuron: Neuron,
    layer: str,
    *,
    baseline: Any = None,
    multiply_by_inputs: bool = True,
    attribute_to_neuron_input: bool = False,
    check_finite: bool = True,
) -> TensorOrTuple:
    r"""DeepLift (rescale rule) of one neuron (Captum's ``NeuronDeepLift``): ``ax.deeplift`` with the
    multipliers propagated from the neuron instead of the output, so that the attributions sum
    to :math:`y_j(x) - y_j(x')` (for a callable neuron: the multipliers start from
    :math:`\partial g/\partial y` at ``x``, exact for selections and sums of neurons).

    Only the layer's ancestors need DeepLift rules. Input and reference run as two streams
    (never one concatenated batch), as in ``ax.deeplift``.

    Args:
        neuron, layer, attribute_to_neuron_input: As for :func:`gradient`.
        baseline: The reference :math:`x'`: zeros when ``None``, a number, a tensor broadcastable
            to ``x`` or a callable ``baseline(x)``.
        multiply_by_inputs: With False, the multipliers alone (Captum's "local" DeepLift).
    Returns:
        Attributions with the shape, dtype and device of ``x``.
    """
    to_input = check_flag(attribute_to_neuron_input, "attribute_to_neuron_input")
    multiply = check_flag(multiply_by_inputs, "multiply_by_inputs")
    xs, params, is_tuple, batch, _ = _start(model_fn, params, x, None, check_finite)
    bs = baselines_for(call_baseline(baseline, xs, is_tuple), xs, check_finite=check_finite)
    site = _Layer(model_fn, params, xs, layer, to_input, neuron)
    plan = site.rules(deeplift_rule, "neuron.deeplift")
    with eager_no_grad():
        aux_x: dict[int, Any] = {}
        aux_r: dict[int, Any] = {}
        env_x = forward(site.program, params, xs, aux=aux_x)
        env_r = forward(site.program, params, bs, shared=env_x, aux=aux_r)
        streams = Streams(site.program, env_x, env_r, batch, aux_x, aux_r)
        y = upcast(site.checked(env_x[site.node]))
        grads = run_plan(site.program, plan, streams, {site.node: seed(y, site.neuron)})
        mult = tuple(grads[i] if i in grads else torch.zeros_like(upcast(b)) for i, b in enumerate(bs))
        attrs = tuple(((upcast(xi) - upcast(b)) * m if multiply else m).to(xi.dtype) for xi, b, m in zip(xs, bs, mult))
    return _pack(attrs, is_tuple)


@_takes_neuron
@forward_args
def guided_backprop(model_fn: ModelFn, params: Params, x: TensorOrTuple, neuron: Neuron, layer: str, *,
                    attribute_to_neuron_input: bool = False, check_finite: bool = True) -> TensorOrTuple:
    """Guided backpropagation of one neuron (Captum's ``NeuronGuidedBackprop``): ``ax.guided_backprop``
    with the backward pass started at the neuron, every ReLU below it passing only positive
    gradient where its input was positive.

    Args:
        neuron, layer, attribute_to_neuron_input: As for :func:`gradient`.
    Returns:
        Attributions with the shape, dtype and device of ``x``.
    """
    to_input = check_flag(attribute_to_neuron_input, "attribute_to_neuron_input")
    xs, params, is_tuple, batch, _ = _start(model_fn, params, x, None, check_finite)
    site = _Layer(model_fn, params, xs, layer, to_input, neuron)
    plan = site.rules(_guided_rule, "neuron.guided_backprop")
    with eager_no_grad():
        aux: dict[int, Any] = {}
        env = forward(site.program, params, xs, aux=aux)
        streams = Streams(site.program, env, None, batch, aux)
        grads = run_plan(site.program, plan, streams, {site.node: seed(upcast(site.checked(env[site.node])), site.neuron)})
        out = tuple(grads[i].to(xi.dtype) if i in grads else torch.zeros_like(xi) for i, xi in enumerate(xs))
    return _pack(out, is_tuple)
