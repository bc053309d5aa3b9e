"""Hypothesis strategies for random small models, and axiom checks.

Import requires ``hypothesis`` (the ``test`` extra). Every strategy draws a seed
and builds the model deterministically from it, so failures shrink and replay.

    >>> from hypothesis import given
    >>> import attrax as ax
    >>> from attrax.testing import relu_mlps, check_completeness
    >>> @given(relu_mlps())
    ... def test_ig_complete(case):
    ...     attr = ax.integrated_gradients(case.model_fn, case.params, case.x, case.target, n_steps=128)
    ...     check_completeness(case, attr, rtol=1e-2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from .core import FunctionalModel, functionalize

__all__ = [
    "Case",
    "cnns",
    "mlps",
    "relu_cnns",
    "relu_mlps",
    "resnets",
    "check_batch_invariance",
    "check_completeness",
    "check_dummy",
    "check_implementation_invariance",
    "check_linearity",
    "permuted",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


@dataclass
class Case:
    """A random model with inputs: everything a method call needs."""

    module: nn.Module
    model_fn: FunctionalModel
    params: dict[str, Tensor]
    x: Tensor
    baseline: Tensor
    target: Tensor
    seed: int
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Case(seed={self.seed}, x={tuple(self.x.shape)}, {self.info})"


def _finish(module: nn.Module, x_shape: tuple[int, ...], n_out: int, seed: int, dtype: torch.dtype, info: dict[str, Any]) -> Case:
    g = torch.Generator().manual_seed(seed)
    module = module.to(dtype).eval()
    for bn in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        with torch.no_grad():  # non-trivial eval statistics
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=dtype) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=dtype) + 0.5)
            if bn.affine:
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=g, dtype=dtype) + 0.5)
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=g, dtype=dtype) * 0.1)
    x = torch.randn(x_shape, generator=g, dtype=dtype)
    baseline = torch.randn(x_shape, generator=g, dtype=dtype) * 0.5
    target = torch.randint(n_out, (x_shape[0],), generator=g)
    model_fn, params = functionalize(module)
    return Case(module, model_fn, params, x, baseline, target, seed, info)


@st.composite
def mlps(
    draw: Any,
    activations: tuple[str, ...] = tuple(ACTIVATIONS),
    max_depth: int = 3,
    max_width: int = 12,
    dtype: torch.dtype = torch.float64,
    bias: bool = True,
) -> Case:
    """Random MLPs: 1..max_depth hidden layers, one random activation each."""
    seed = draw(st.integers(0, 2**31 - 1))
    depth = draw(st.integers(1, max_depth))
    widths = [draw(st.integers(2, max_width)) for _ in range(depth + 1)]
    n_out = draw(st.integers(1, 5))
    acts = [draw(st.sampled_from(activations)) for _ in range(depth)]
    batch = draw(st.integers(1, 4))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(widths[i], widths[i + 1], bias=bias), ACTIVATIONS[acts[i]]()]
    layers.append(nn.Linear(widths[-1], n_out, bias=bias))
    return _finish(nn.Sequential(*layers), (batch, widths[0]), n_out, seed, dtype, {"acts": acts, "widths": widths})


def relu_mlps(**kwargs: Any) -> st.SearchStrategy[Case]:
    """Random ReLU MLPs."""
    return mlps(activations=("relu",), **kwargs)


@st.composite
def cnns(
    draw: Any,
    activations: tuple[str, ...] = tuple(ACTIVATIONS),
    pools: tuple[str, ...] = ("none", "max", "avg"),
    batchnorm: bool = False,
    dtype: torch.dtype = torch.float64,
    bias: bool = True,
) -> Case:
    """Random small CNNs: 1-2 conv blocks (conv, [bn], act, [pool]), flatten, linear."""
    seed = draw(st.integers(0, 2**31 - 1))
    n_blocks = draw(st.integers(1, 2))
    c_in = draw(st.integers(1, 3))
    size = draw(st.sampled_from([6, 8]))
    batch = draw(st.integers(1, 3))
    n_out = draw(st.integers(2, 5))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c, s = c_in, size
    info: dict[str, Any] = {"blocks": []}
    for _ in range(n_blocks):
        c_out = draw(st.integers(2, 6))
        act = draw(st.sampled_from(activations))
        pool = draw(st.sampled_from(pools))
        layers.append(nn.Conv2d(c, c_out, 3, padding=1, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(ACTIVATIONS[act]())
        if pool == "max":
            layers.append(nn.MaxPool2d(2))
            s //= 2
        elif pool == "avg":
            layers.append(nn.AvgPool2d(2))
            s //= 2
        info["blocks"].append((c_out, act, pool))
        c = c_out
    layers += [nn.Flatten(), nn.Linear(c * s * s, n_out, bias=bias)]
    return _finish(nn.Sequential(*layers), (batch, c_in, size, size), n_out, seed, dtype, info)


def relu_cnns(**kwargs: Any) -> st.SearchStrategy[Case]:
    """Random ReLU CNNs with max/avg pooling."""
    return cnns(activations=("relu",), **kwargs)


class _Block(nn.Module):
    """conv-[bn]-act-conv-[bn] plus a skip connection, then act (torchvision BasicBlock style)."""

    def __init__(self, c: int, act: str, batchnorm: bool, bias: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(c) if batchnorm else nn.Identity()
        self.act = ACTIVATIONS[act]()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(c) if batchnorm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + x
        return self.act(out)


class _ResNet(nn.Module):
    def __init__(self, c_in: int, c: int, n_blocks: int, act: str, pool: str, batchnorm: bool, n_out: int,
                 softmax: bool, bias: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(c_in, c, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(c) if batchnorm else nn.Identity()
        self.act = ACTIVATIONS[act]()
        self.pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "none": nn.Identity()}[pool]
        self.blocks = nn.Sequential(*[_Block(c, act, batchnorm, bias) for _ in range(n_blocks)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_out, bias=bias))
        self.softmax = nn.Softmax(dim=1) if softmax else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.softmax(self.head(self.blocks(self.pool(self.act(self.bn(self.stem(x)))))))


@st.composite
def resnets(
    draw: Any,
    activations: tuple[str, ...] = tuple(ACTIVATIONS),
    pools: tuple[str, ...] = ("none", "max", "avg"),
    batchnorm: bool | None = None,
    softmax: bool | None = None,
    dtype: torch.dtype = torch.float64,
    bias: bool = True,
) -> Case:
    """Random small residual CNNs: stem conv, [BN], act, [pool], 1-2 residual blocks, GAP, linear, [softmax].

    ``batchnorm`` / ``softmax`` None means drawn at random.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    c_in = draw(st.integers(1, 3))
    c = draw(st.integers(2, 6))
    n_blocks = draw(st.integers(1, 2))
    act = draw(st.sampled_from(activations))
    pool = draw(st.sampled_from(pools))
    bn = draw(st.booleans()) if batchnorm is None else batchnorm
    sm = draw(st.booleans()) if softmax is None else softmax
    n_out = draw(st.integers(2, 5))
    batch = draw(st.integers(1, 3))
    size = draw(st.sampled_from([4, 6, 8]))
    torch.manual_seed(seed)
    module = _ResNet(c_in, c, n_blocks, act, pool, bn, n_out, sm, bias)
    info = {"act": act, "pool": pool, "bn": bn, "softmax": sm, "blocks": n_blocks}
    return _finish(module, (batch, c_in, size, size), n_out, seed, dtype, info)


def check_completeness(case: Case, attributions: Tensor, *, rtol: float = 1e-3, atol: float = 1e-6, baseline: Tensor | None = None) -> None:
    """Assert ``|sum(attr) - (f(x) - f(x'))| <= atol + rtol * |f(x) - f(x')|`` per sample."""
    from .metrics import completeness_delta
    from .targets import check_target, select

    b = torch.zeros_like(case.x) if baseline is None else baseline
    delta = completeness_delta(case.model_fn, case.params, case.x, case.target, attributions, baseline=b)
    t = check_target(case.target, case.x.shape[0])
    with torch.no_grad():
        span = (select(case.model_fn(case.params, case.x), t) - select(case.model_fn(case.params, b), t)).abs()
    bad = delta.abs() > atol + rtol * span
    if bool(bad.any()):
        raise AssertionError(f"completeness violated for {case}: delta {delta.tolist()} vs f(x)-f(x') {span.tolist()}")


# ------------------------------------------------------------------------ axiom checks


def _close(a: Tensor, b: Tensor, rtol: float, atol: float, what: str) -> None:
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: max abs difference {float((a - b).abs().max()):.3g} (rtol {rtol}, atol {atol})")


def check_batch_invariance(attribute: Callable[..., Tensor], case: Case, *, rtol: float = 1e-6, atol: float = 1e-9,
                           **method_kwargs: Any) -> None:
    """Attributing the batch equals attributing each sample alone."""
    whole = attribute(case.model_fn, case.params, case.x, case.target, **method_kwargs)
    for i in range(case.x.shape[0]):
        one = attribute(case.model_fn, case.params, case.x[i : i + 1], case.target[i : i + 1], **method_kwargs)
        _close(whole[i : i + 1], one, rtol, atol, f"batch invariance, sample {i}, {case}")


def permuted(case: Case, seed: int = 0) -> Case:
    """The same function with the hidden units of every inner Linear/Conv layer permuted.

    A functionally identical network with different parameters, for implementation invariance.
    Works on ``mlps``/``cnns``-style ``nn.Sequential`` models (layers followed by elementwise ops).
    """
    import copy

    module = copy.deepcopy(case.module)
    layers = [m for m in module if isinstance(m, (nn.Linear, nn.Conv2d))] if isinstance(module, nn.Sequential) else []
    if len(layers) < 2:
        raise ValueError("permuted() needs an nn.Sequential with at least two Linear/Conv2d layers")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for first, second in zip(layers, layers[1:]):
            if isinstance(first, nn.Conv2d) != isinstance(second, nn.Conv2d):
                continue  # conv -> flatten -> linear: the flattened order would need the spatial map too
            perm = torch.randperm(first.weight.shape[0], generator=g)
            first.weight.copy_(first.weight[perm])
            if first.bias is not None:
                first.bias.copy_(first.bias[perm])
            second.weight.copy_(second.weight[:, perm])
    model_fn, params = functionalize(module)
    return Case(module, model_fn, params, case.x, case.baseline, case.target, case.seed, {**case.info, "permuted": seed})


def check_implementation_invariance(attribute: Callable[..., Tensor], case: Case, other: Case, *, rtol: float = 1e-6,
                                    atol: float = 1e-9, **method_kwargs: Any) -> None:
    """Two networks computing the same function get the same attributions (Sundararajan et al. 2017)."""
    with torch.no_grad():
        _close(case.model_fn(case.params, case.x), other.model_fn(other.params, other.x), 1e-9, 1e-9, "the two models differ")
    a = attribute(case.model_fn, case.params, case.x, case.target, **method_kwargs)
    b = attribute(other.model_fn, other.params, other.x, other.target, **method_kwargs)
    _close(a, b, rtol, atol, f"implementation invariance, {case}")


def check_dummy(attribute: Callable[..., Tensor], case: Case, feature: int = 0, *, atol: float = 1e-9,
                **method_kwargs: Any) -> None:
    """A feature the model does not depend on gets zero attribution (the dummy axiom).

    Wraps the model so that flat input feature ``feature`` is replaced by 0 before the model sees it.
    """

    def ignoring(params: Any, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        mask = (torch.arange(flat.shape[1], device=x.device) != feature).to(x.dtype)
        return case.model_fn(params, (flat * mask).reshape(x.shape))

    attr = attribute(ignoring, case.params, case.x, case.target, **method_kwargs)
    value = attr.reshape(attr.shape[0], -1)[:, feature]
    if not bool((value.abs() <= atol).all()):
        raise AssertionError(f"dummy feature {feature} got attribution {value.tolist()} for {case}")


def check_linearity(attribute: Callable[..., Tensor], case: Case, other: Case, alpha: float = 2.0, beta: float = -0.5,
                    *, rtol: float = 1e-6, atol: float = 1e-9, **method_kwargs: Any) -> None:
    """Attributions of ``alpha f + beta g`` equal ``alpha A(f) + beta A(g)`` (the linearity axiom).

    ``case`` and ``other`` must share the input and output shapes (e.g. two draws of one strategy
    with fixed widths).
    """

    def combined(params: Any, x: Tensor) -> Tensor:
        return alpha * case.model_fn(params["f"], x) + beta * other.model_fn(params["g"], x)

    both = {"f": case.params, "g": other.params}

    def flat_fn(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return combined({"f": {k[2:]: v for k, v in p.items() if k.startswith("f.")},
                         "g": {k[2:]: v for k, v in p.items() if k.startswith("g.")}}, x)

    params = {**{f"f.{k}": v for k, v in both["f"].items()}, **{f"g.{k}": v for k, v in both["g"].items()}}
    a = attribute(flat_fn, params, case.x, case.target, **method_kwargs)
    fa = attribute(case.model_fn, case.params, case.x, case.target, **method_kwargs)
    ga = attribute(other.model_fn, other.params, case.x, case.target, **method_kwargs)
    _close(a, alpha * fa + beta * ga, rtol, atol, f"linearity, {case}")
