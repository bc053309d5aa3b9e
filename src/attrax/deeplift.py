r"""DeepLift (rescale rule), DeepLiftShap, guided backprop and deconvnet on the rewrite engine.

DeepLift runs the traced program twice, on the input and on the reference, with
ordinary ops, and then propagates multipliers from the target output back to
the input: exact transposes at linear nodes, secant slopes at elementwise
nonlinearities, an exact per-window rule at max pooling, an exact row-wise split
at softmax and a symmetric split at products. The input and the reference never
share a batch, so BatchNorm statistics and softmax normalisation cannot mix
samples (the known failure of concatenating them, as Captum does).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from ._types import ModelFn, Params, Target, TensorOrTuple
from .core import baselines_for, check_positive_int, chunks, eager_no_grad, forward_args, is_concrete, publish_output
from .rewrite import Node, Program, Streams, forward, program_for, substitute
from .rules.deeplift import (Bilinear, CrossMax, DeconvReLU, DisjointCrossMax, Gradient, GuidedReLU, NormScale,
                             ReduceCrossMax, ReluMaxPool, Rescale, SoftmaxRescale, upcast)
from .rules.graph import (BILINEAR, MAXPOOL, PIECEWISE_CONSTANT, RELU_INSIDE, SOFTMAX, disjoint_max_pool,
                          exclusive_relu_input, is_elementwise, is_linear, is_relu, n_dep, norm_scale_operand,
                          reduces_max, selected_by_input)
from .rules.plan import run_plan
from .targets import ResolvedTarget, check_selects, prepare_call, repeat_target, select
from .gradients import _check_delta_flags, call_baseline, convergence_delta

__all__ = ["deconvnet", "deeplift", "deeplift_shap", "guided_backprop"]

_GRADIENT, _RESCALE, _CROSSMAX, _SOFTMAX, _BILINEAR = Gradient(), Rescale(), CrossMax(), SoftmaxRescale(), Bilinear()
_GUIDED, _DECONV, _RELU_MAXPOOL, _DISJOINT_CROSSMAX = GuidedReLU(), DeconvReLU(), ReluMaxPool(), DisjointCrossMax()
_REDUCE_MAX = ReduceCrossMax()


def deeplift_rule(program: Program, node: Node) -> Any:
    """DeepLift's rule for one call site, or None when DeepLift has none."""
    if is_linear(program, node):
        return _GRADIENT
    if selected_by_input(program, node):
        return None
    if is_elementwise(node):
        return _RESCALE
    if node.packet in MAXPOOL and n_dep(node) == 1:
        if not disjoint_max_pool(program, node):
            return _CROSSMAX
        return _RELU_MAXPOOL if exclusive_relu_input(program, node) else _DISJOINT_CROSSMAX
    if reduces_max(node):
        return _REDUCE_MAX
    if node.packet in SOFTMAX and n_dep(node) == 1:
        return _SOFTMAX
    if node.packet in BILINEAR and n_dep(node) == 2:
        at = norm_scale_operand(program, node)
        return _BILINEAR if at is None else NormScale(at)
    return None


#: (id(program), rule policy) -> (weak reference to the program, its plan); an entry leaves with its program
_PLANS: dict[tuple[int, Any], tuple[Any, tuple[Any, ...]]] = {}


def _plan(program: Program, rule_for: Any, method: str) -> tuple[Any, ...]:
    """``substitute(program, rule_for, method)``, memoised per program object (programs are memoised by
    the model, so repeated calls pay the pass once: ~1 ms per call on a 4-layer transformer). A plan is
    a pure function of the program and the policy; failures are not memoised (they raise each time)."""
    if torch.compiler.is_compiling():
        return substitute(program, rule_for, method)
    key = (id(program), rule_for)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is program:
        return hit[1]
    plan = substitute(program, rule_for, method)
    _PLANS[key] = (weakref.ref(program, lambda _, k=key: _PLANS.pop(k, None)), plan)
    return plan


def _guided_rule(program: Program, node: Node) -> Any:
    return _GUIDED if is_relu(node) else _gradient_rule(program, node)


def _deconv_rule(program: Program, node: Node) -> Any:
    return _DECONV if is_relu(node) else _gradient_rule(program, node)


def _gradient_rule(program: Program, node: Node) -> Any:
    """The exact gradient, except where it is zero almost everywhere (round, sign, argmax...) or a
    float's bits are reinterpreted: there no gradient-based explanation is meaningful. A fused op with
    a ReLU inside (``aten.rnn_relu``) has no rule either: its gradient would pass the inner ReLUs
    unmodified, the plain gradient presented as guided backprop or deconvnet."""
    if node.packet in PIECEWISE_CONSTANT or node.packet in RELU_INSIDE or node.target == "aten.view.dtype" or (
            node.packet == "div" and any(k == "rounding_mode" and v != ("c", None) for k, v in node.kwargs)):
        return None
    return _GRADIENT


def seed(out: Tensor, target: ResolvedTarget) -> Tensor:
    """The cotangent on the model output that selects the target (exact for linear selections).

    Index targets give the one-hot cotangent directly (a vjp through the selection costs more
    than a small model's rule pass); a callable target is differentiated at ``out``.
    """
    if target.kind == "callable":
        selected, pullback = torch.func.vjp(lambda o: select(o, target), out)
        return pullback(torch.ones_like(selected))[0]
    if target.kind == "tensor" and (torch.compiler.is_compiling() or not is_concrete(target.value)):
        # no values to check the range on (compiled, vmapped over targets): the selection's own index check
        # fails instead (a compiled explainer reruns eagerly for the method's error); compiled, that selection is
        # dead code, so the range is asserted in the graph (a runtime error, never a wrapped index)
        select(out, target)
        if torch.compiler.is_compiling():
            n = out.shape[1]
            idx = target.value
            torch._assert_async(((idx >= -n) & (idx < n)).all(), "target out of range")
    else:
        check_selects(out, target)  # the target against the output's shape and range
    if target.kind == "none":
        return torch.ones_like(out)
    if target.kind == "tensor":
        # Python indexing: -1 is the last output (select() has checked the range)
        idx = (target.value.to(out.device).expand(out.shape[0]) % out.shape[1]).unsqueeze(1)
        return torch.zeros_like(out).scatter(1, idx, 1.0)
    index = (slice(None), target.value) if target.kind == "int" else (slice(None), *target.value)
    g = torch.zeros_like(out)
    g[index] = 1
    return g


@forward_args
def deeplift(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    *,
    baseline: Any = None,
    multiply_by_inputs: bool = True,
    return_convergence_delta: bool = False,
    check_finite: bool = True,
) -> Any:
    r"""DeepLift with the rescale rule [1].

    Attributions :math:`a = (x - x') \odot m` where the multipliers :math:`m` are
    propagated from the target output with DeepLift's rules, so that
    :math:`\sum_i a_i = f_t(x) - f_t(x')` exactly (summation-to-delta) for
    networks built from the supported operations: linear layers and
    convolutions, BatchNorm (eval), pooling, residual adds, reshapes and
    concatenation, ReLU, LeakyReLU, ELU, Sigmoid, Tanh, Softplus, GELU, SiLU
    (and other elementwise ops), max pooling, softmax / log-softmax and products
    of two activations. Any other nonlinearity raises ``ValueError`` naming the
    op and the module, before any computation.

    Args:
        model_fn: Maps ``(params, *x)`` to ``(B, ...)``; traced once per input shape.
        baseline: The reference :math:`x'`: zeros when ``None``, a number, or a
            tensor broadcastable to ``x``.
        multiply_by_inputs: Return :math:`(x - x') \odot m` (default, "global"
            attributions); with False return the multipliers :math:`m` (Captum's
            convention).
        return_convergence_delta: Also return the signed completeness gap
            :math:`\sum a - (f_t(x) - f_t(x'))` per sample, ``(attr, delta)`` (Captum's flag; the
            sign convention of ``ax.metrics.completeness_delta``).
    Returns:
        Attributions with the shape, dtype and device of ``x``.
    Raises:
        ValueError: For a bad target or baseline, an unsupported operation, or a
            model that cannot be traced.
    References:
        [1] Shrikumar, Greenside, Kundaje. Learning Important Features Through
            Propagating Activation Differences. ICML 2017. arXiv:1704.02685.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> x = torch.randn(2, 3)
        >>> a = ax.deeplift(model_fn, params, x, 1)
        >>> bool(ax.metrics.completeness_delta(model_fn, params, x, 1, a).abs().max() < 1e-5)
        True
    """
    _check_delta_flags(multiply_by_inputs, return_convergence_delta)
    xs, params, is_tuple, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite)
    bs = baselines_for(call_baseline(baseline, xs, is_tuple), xs, check_finite=check_finite)
    program = program_for(model_fn, params, xs, "deeplift")
    plan = _plan(program, deeplift_rule, "deeplift")
    with eager_no_grad():
        aux_x: dict[int, Any] = {}
        env_x = forward(program, params, xs, aux=aux_x)
        publish_output(xs, env_x[program.output])
        mult = _multipliers(program, plan, params, env_x, aux_x, bs, t, batch, len(xs), own_x=True)
        attrs = tuple(_times_delta(xi, b, m) if multiply_by_inputs else m.to(xi.dtype) for xi, b, m in zip(xs, bs, mult))
    result = attrs if is_tuple else attrs[0]
    if return_convergence_delta:
        return result, convergence_delta(model_fn, params, xs, bs, t, attrs)
    return result


def _getitems(program: Program) -> dict[int, tuple[int, ...]]:
    """``{tuple-valued node: its getitem nodes}``."""
    out: dict[int, list[int]] = {}
    for node in program.nodes:
        if node.op == "call" and node.target == "getitem":
            out.setdefault(node.refs[0], []).append(node.index)
    return {k: tuple(v) for k, v in out.items()}


def _times_delta(x: Tensor, ref: Tensor, m: Tensor) -> Tensor:
    """``(x - ref) * m`` in the multipliers' precision (float32 for float16/bfloat16 inputs), in ``x``'s dtype."""
    return ((upcast(x) - upcast(ref)) * m).to(x.dtype)


def _multipliers(program: Program, plan: Any, params: Any, env_x: list[Any], aux_x: dict[int, Any],
                 refs: tuple[Tensor, ...], target: ResolvedTarget, batch: Any, n_inputs: int,
                 own_x: bool = False) -> tuple[Tensor, ...]:
    """The multipliers at the inputs. With ``own_x`` the caller hands over ``env_x`` (emptied here)."""
    aux_r: dict[int, Any] = {}
    env_r = forward(program, params, refs, shared=env_x, aux=aux_r)
    seeds = {program.output: seed(upcast(env_x[program.output]), target)}
    streams = Streams(program, env_x if own_x else list(env_x), env_r, batch, aux_x, aux_r)

    items = _getitems(program)

    def release(node: Node, grads: dict[int, Any]) -> dict[int, Any]:
        # a node's values are read by its own rule and its consumers' rules, all visited by now (reverse
        # order): dropping them lets the later rules' temporaries reuse their memory instead of fresh
        # pages (a page fault costs ~4 us on the machines measured; ~8000 per call on a 4-layer Llama).
        # A tuple-valued node's getitem entries go with it: they are views that keep its buffer alive
        # (GPT-2's q/k/v split of the whole c_attn output)
        streams.x[node.index] = streams.ref[node.index] = None
        for j in items.get(node.index, ()):
            streams.x[j] = streams.ref[j] = None
        return grads

    # float16/bfloat16 models: the reverse pass carries float32 cotangents (the rules compute in
    # float32 from the streams' values); the multipliers are float32 and cast once at the end
    grads = run_plan(program, plan, streams, seeds, leave=release)
    return tuple(grads[i] if i in grads else torch.zeros_like(upcast(refs[i])) for i in range(n_inputs))


@forward_args
def deeplift_shap(
    model_fn: ModelFn,
    params: Params,
    x: TensorOrTuple,
    target: Target,
    baselines: Any,
    *,
    chunk_size: int | None = None,
    multiply_by_inputs: bool = True,
    return_convergence_delta: bool = False,
    check_finite: bool = True,
) -> Any:
    r"""DeepLiftShap: the mean of DeepLift over a distribution of baselines [1].

    :math:`a = \frac1N \sum_k (x - x'_k) \odot m(x, x'_k)`, so that
    :math:`\sum_i a_i = f_t(x) - \frac1N\sum_k f_t(x'_k)`. The input's forward
    pass is computed once and shared; the references are processed
    ``chunk_size`` baselines at a time, vectorised with ``torch.func.vmap``, so
    at most ``chunk_size * B`` input-reference pairs are alive at once.

    Args:
        baselines: Shape ``(N, *x.shape[1:])`` (a tuple for tuple inputs), or a callable
            ``baselines(x)`` returning them.
        chunk_size: Baselines per vectorised chunk; ``None`` takes all N at once.
        multiply_by_inputs: With False, the mean of the multipliers :math:`m(x, x'_k)` (Captum's
            "local" attributions) instead of :math:`(x - x'_k) \odot m`.
        return_convergence_delta: Also return :math:`\sum a - (f_t(x) - \frac1N\sum_k f_t(x'_k))`.
    Returns:
        Attributions with the shape, dtype and device of ``x``.
    References:
        [1] Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> x, bl = torch.randn(2, 3), torch.randn(5, 3)
        >>> a = ax.deeplift_shap(model_fn, params, x, None, bl, chunk_size=2)
        >>> with torch.no_grad():
        ...     gap = a.sum(1) - (model_fn(params, x)[:, 0] - model_fn(params, bl)[:, 0].mean())
        >>> bool(gap.abs().max() < 1e-5)
        True
    """
    from .gradients import _check_distribution

    _check_delta_flags(multiply_by_inputs, return_convergence_delta)
    xs, params, is_tuple, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    bls = _check_distribution(call_baseline(baselines, xs, is_tuple), xs, "baselines", check_finite=check_finite)
    program = program_for(model_fn, params, xs, "deeplift_shap")
    plan = _plan(program, deeplift_rule, "deeplift_shap")
    n = bls[0].shape[0]
    with eager_no_grad():
        aux_x: dict[int, Any] = {}
        env_x = forward(program, params, xs, aux=aux_x)
        publish_output(xs, env_x[program.output])

        def one(*refs: Tensor) -> tuple[Tensor, ...]:
            expanded = tuple(r.unsqueeze(0).expand_as(xi) for r, xi in zip(refs, xs))
            mult = _multipliers(program, plan, params, env_x, aux_x, expanded, t, batch, len(xs))
            if not multiply_by_inputs:
                return mult
            return tuple((upcast(xi) - upcast(r)) * m for xi, r, m in zip(xs, expanded, mult))

        total = [torch.zeros_like(upcast(xi)) for xi in xs]
        for start, stop in chunks(n, chunk_size):
            if isinstance(batch, torch.SymInt) or (torch.compiler.is_compiling() and program.batch is None):
                # symbolic batch (export, torch.compile): vmap's conv batching rule would pin the
                # batch size, so the chunk's baselines are folded into the batch instead (a program traced at
                # its batch, as for per-sample additional_forward_args bound by ax.compile, runs at that batch)
                attrs = _folded(program, plan, params, xs, tuple(b[start:stop] for b in bls), t, batch,
                                multiply_by_inputs)
            else:
                attrs = torch.func.vmap(one)(*(b[start:stop] for b in bls))
            total = [s + a.sum(0) for s, a in zip(total, attrs)]
    result = tuple((s / n).to(xi.dtype) for s, xi in zip(total, xs))
    packed = result if is_tuple else result[0]
    if return_convergence_delta:
        return packed, _shap_delta(model_fn, params, xs, bls, t, result)
    return packed


def _shap_delta(model_fn: ModelFn, params: Params, xs: tuple[Tensor, ...], bls: tuple[Tensor, ...],
                t: ResolvedTarget, attrs: tuple[Tensor, ...]) -> Tensor:
    """:math:`\\sum a - (f_t(x) - \\frac1N \\sum_k f_t(x'_k))` per sample (each sample's own target at every baseline)."""
    n, b = bls[0].shape[0], xs[0].shape[0]
    with eager_no_grad():
        fx = select(model_fn(params, *xs), t)
        rep = tuple(r.unsqueeze(1).expand(n, b, *r.shape[1:]).reshape(n * b, *r.shape[1:]) for r in bls)
        fr = select(model_fn(params, *rep), repeat_target(t, n)).reshape(n, b).mean(0)
    total = sum(a.reshape(b, -1).sum(1) for a in attrs)
    return total - (fx - fr).to(total.dtype)


def _folded(program: Program, plan: Any, params: Any, xs: tuple[Tensor, ...], refs: tuple[Tensor, ...],
            t: ResolvedTarget, batch: Any, multiply_by_inputs: bool = True) -> tuple[Tensor, ...]:
    """DeepLift of every sample against ``k`` baselines at once, the pairs folded into a ``k * B`` batch."""
    k = refs[0].shape[0]
    x_rep = tuple(xi.unsqueeze(0).expand(k, *xi.shape).reshape(k * batch, *xi.shape[1:]) for xi in xs)
    r_rep = tuple(r.unsqueeze(1).expand(k, *xi.shape).reshape(k * batch, *xi.shape[1:]) for r, xi in zip(refs, xs))
    aux_x: dict[int, Any] = {}
    env_x = forward(program, params, x_rep, aux=aux_x)
    mult = _multipliers(program, plan, params, env_x, aux_x, r_rep, repeat_target(t, k), k * batch, len(xs), own_x=True)
    if not multiply_by_inputs:
        return tuple(m.reshape(k, *xi.shape) for m, xi in zip(mult, xs))
    return tuple(((upcast(xr) - upcast(rr)) * m).reshape(k, *xi.shape) for xr, rr, m, xi in zip(x_rep, r_rep, mult, xs))


def _relu_method(rule_for: Any, method: str, model_fn: ModelFn, params: Params, x: TensorOrTuple, target: Target,
                 check_finite: bool) -> TensorOrTuple:
    xs, params, is_tuple, batch, t = prepare_call(model_fn, params, x, target, check_finite=check_finite)
    program = program_for(model_fn, params, xs, method)
    plan = _plan(program, rule_for, method)
    with eager_no_grad():
        aux: dict[int, Any] = {}
        env = forward(program, params, xs, aux=aux)
        publish_output(xs, env[program.output])
        streams = Streams(program, env, None, batch, aux)
        grads = run_plan(program, plan, streams, {program.output: seed(upcast(env[program.output]), t)})
        out = tuple(grads[i].to(xi.dtype) if i in grads else torch.zeros_like(xi) for i, xi in enumerate(xs))
    return out if is_tuple else out[0]


@forward_args
def guided_backprop(
    model_fn: ModelFn, params: Params, x: TensorOrTuple, target: Target, *, check_finite: bool = True
) -> TensorOrTuple:
    """Guided backpropagation [1]: the gradient with every ReLU passing only positive
    gradient where its input was positive.

    Applied at every ReLU call site, whatever its spelling (module, reused
    module, ``F.relu``, ``x.relu()``, in place, ``x.clamp(min=0)``,
    ``x.clamp_min(0)``, ``F.threshold(x, 0, 0)``); other operations use their
    exact gradient, as in Captum. An op with a ReLU inside that the rule cannot
    reach (``nn.RNN(nonlinearity="relu")``, ``nn.RNNCell``) raises ``ValueError``
    naming it, as DeepLift does.

    References:
        [1] Springenberg, Dosovitskiy, Brox, Riedmiller. Striving for Simplicity:
            The All Convolutional Net. arXiv:1412.6806.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> ax.guided_backprop(model_fn, params, torch.randn(2, 3), 0).shape
        torch.Size([2, 3])
    """
    return _relu_method(_guided_rule, "guided_backprop", model_fn, params, x, target, check_finite)


@forward_args
def deconvnet(
    model_fn: ModelFn, params: Params, x: TensorOrTuple, target: Target, *, check_finite: bool = True
) -> TensorOrTuple:
    """Deconvnet [1]: the gradient with every ReLU rectifying the gradient instead of
    masking it by the forward activation.

    ReLUs are recognised in every spelling and ops with a ReLU inside refused, as
    for :func:`guided_backprop`.

    References:
        [1] Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014.

    Example:
        >>> import torch, attrax as ax
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
        >>> model_fn, params = ax.functionalize(net)
        >>> ax.deconvnet(model_fn, params, torch.randn(2, 3), 0).shape
        torch.Size([2, 3])
    """
    return _relu_method(_deconv_rule, "deconvnet", model_fn, params, x, target, check_finite)

