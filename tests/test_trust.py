"""Trust: no stale programs, no crashes on everyday ops, nothing of the user's changed (issue 15).

The zoo below spells small models the ways real code does (tuple-returning ops, casts, padding
modes, shared weights, hooks, modules edited after ``functionalize``). Every rule method must give
either a result that is right (completeness where the method has it, and always the result of a
fresh trace of the model as it is now) or a ``ValueError`` naming the op or module: never a crash,
never a stale or silently wrong number.
"""

from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attrax as ax
from conftest import assert_unchanged, module_snapshot

D = torch.float64


# ------------------------------------------------------------------------------ the zoo


class SplitGate(nn.Module):  # GLU-style gate from split
    def __init__(self) -> None:
        super().__init__()
        self.up, self.out = nn.Linear(5, 8), nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.up(x).split(4, dim=1)
        return self.out(a * torch.sigmoid(b))


class ChunkSwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.out = nn.Linear(5, 8), nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.out(F.silu(a) * b)


class Unbind(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.out = nn.Linear(5, 8), nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.up(x).view(-1, 2, 4).unbind(1)
        return self.out(torch.relu(a) + b)


class MaxOverDim(nn.Module):
    def __init__(self, op: str = "max") -> None:
        super().__init__()
        self.up, self.out, self.op = nn.Linear(5, 12), nn.Linear(4, 3), op

    def forward(self, x):
        h = self.up(x).view(-1, 3, 4)
        v = h.max(dim=1).values if self.op == "max" else torch.min(h, 1, keepdim=True)[0].squeeze(1)
        return self.out(torch.tanh(v))


class AdaptiveMax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.out = nn.Conv2d(2, 3, 3), nn.AdaptiveMaxPool2d((3, 2)), nn.Linear(18, 3)

    def forward(self, x):
        return self.out(self.pool(F.relu(self.conv(x))).flatten(1))


class Quantised(nn.Module):  # an integer cast on the input's path: no derivative, no rule
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out((x * 255).clamp(0, 255).to(torch.uint8).to(x.dtype) / 255)


class Padded(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.conv, self.out, self.mode = nn.Conv2d(2, 3, 3), nn.Linear(3 * 7 * 7, 3), mode

    def forward(self, x):
        return self.out(F.relu(self.conv(F.pad(x, (1, 1, 1, 1), mode=self.mode))).flatten(1))


class Tied(nn.Module):  # one Linear called twice, and a weight shared by two layers
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(F.relu(self.a(F.relu(self.a(x)))) + self.b(x))


class Flagged(nn.Module):  # a Python flag selects a branch
    def __init__(self) -> None:
        super().__init__()
        self.up, self.out, self.use_tanh = nn.Linear(5, 6), nn.Linear(6, 3), False

    def forward(self, x):
        h = self.up(x)
        return self.out(torch.tanh(h) if self.use_tanh else F.relu(h))


class Scaled(nn.Module):  # a plain tensor attribute (not a buffer), 1-d and 0-d
    def __init__(self) -> None:
        super().__init__()
        self.up, self.out = nn.Linear(5, 6), nn.Linear(6, 3)
        self.scale = torch.linspace(0.5, 2.0, 6, dtype=D)
        self.shift = torch.tensor(0.25, dtype=D)

    def forward(self, x):
        return self.out(F.relu(self.up(x) * self.scale + self.shift))


class EmptyCat(nn.Module):  # HF's empty KV-cache start: cat with a legacy 1-d empty tensor
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.cat([torch.empty(0, dtype=x.dtype), F.softplus(x), x.new_zeros(x.shape[0], 0)], dim=1)
        return self.out(h)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3))


def swap_activation(m: nn.Module) -> None:
    m[1] = nn.Softplus(beta=5)


def change_slope(m: nn.Module) -> None:
    m[3].negative_slope = 0.7


def flip_flag(m: nn.Module) -> None:
    m.use_tanh = True


def add_hook(m: nn.Module) -> None:
    m[2].register_forward_hook(lambda mod, inp, out: out * 2)


def rescale_in_place(m: nn.Module) -> None:
    m.scale.mul_(3)  # the same tensor object, a new version


def reassign_attribute(m: nn.Module) -> None:
    m.shift = torch.tensor(-1.0, dtype=D)


@dataclass
class Spelling:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    change: Callable[[nn.Module], None] | None = None
    refused: str | None = None  # a ValueError matching this is the right answer for every rule method


ZOO = [
    Spelling("split_gate", SplitGate, (3, 5)),
    Spelling("chunk_swiglu", ChunkSwiGLU, (3, 5)),
    Spelling("unbind", Unbind, (3, 5)),
    Spelling("max_dim", MaxOverDim, (3, 5)),
    Spelling("min_dim_keepdim", lambda: MaxOverDim("min"), (3, 5)),
    Spelling("adaptive_max_pool", AdaptiveMax, (2, 2, 7, 9)),
    Spelling("integer_cast", Quantised, (3, 5), refused="integer dtype"),
    Spelling("reflect_pad", lambda: Padded("reflect"), (2, 2, 7, 7)),
    Spelling("replicate_pad", lambda: Padded("replicate"), (2, 2, 7, 7)),
    Spelling("circular_pad", lambda: Padded("circular"), (2, 2, 7, 7)),
    Spelling("tied_weights", Tied, (3, 5)),
    Spelling("empty_cat", EmptyCat, (3, 5)),
    Spelling("module_swapped", mlp, (3, 5), change=swap_activation),
    Spelling("slope_changed", mlp, (3, 5), change=change_slope),
    Spelling("flag_flipped", Flagged, (3, 5), change=flip_flag),
    Spelling("hook_added", mlp, (3, 5), change=add_hook, refused="forward hook"),
    Spelling("tensor_attribute_in_place", Scaled, (3, 5), change=rescale_in_place),
    Spelling("tensor_attribute_reassigned", Scaled, (3, 5), change=reassign_attribute),
]

RULE_METHODS: dict[str, Callable[..., Any]] = {
    "deeplift": lambda f, p, x, b: ax.deeplift(f, p, x, 1, baseline=b),
    "deeplift_shap": lambda f, p, x, b: ax.deeplift_shap(f, p, x, 1, torch.stack([b[0], 0.5 * b[1]]), chunk_size=1),
    "lrp": lambda f, p, x, b: ax.lrp(f, p, x, 1),
    "guided_backprop": lambda f, p, x, b: ax.guided_backprop(f, p, x, 1),
    "deconvnet": lambda f, p, x, b: ax.deconvnet(f, p, x, 1),
    # every channel of the output layer: equal to plain LRP
    "conditional": lambda f, p, x, b: ax.conditional(f, p, x, 1, [{_output_layer(f.module): [0, 1, 2]}]),
}


def _output_layer(model: nn.Module) -> str:
    return "out" if hasattr(model, "out") else "4"


def _inputs(spelling: Spelling) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(spelling.shape, generator=g, dtype=D), torch.randn(spelling.shape, generator=g, dtype=D)


def _run(method: str, model: nn.Module, f: Any, p: dict, x: torch.Tensor, b: torch.Tensor) -> Any:
    try:
        return RULE_METHODS[method](f, p, x, b)
    except ValueError as e:
        return e


def _expected_delta(method: str, f: Any, p: dict, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        fx = f(p, x)[:, 1]
        if method == "deeplift":
            return fx - f(p, b)[:, 1]
        refs = torch.stack([b[0], 0.5 * b[1]])
        return fx - f(p, refs)[:, 1].mean()


@pytest.mark.parametrize("method", list(RULE_METHODS))
@pytest.mark.parametrize("spelling", ZOO, ids=[s.name for s in ZOO])
def test_every_rule_method_on_every_spelling(spelling: Spelling, method: str) -> None:
    torch.manual_seed(0)
    model = spelling.make().double().eval()
    x, b = _inputs(spelling)
    f, p = ax.functionalize(model)
    first = _run(method, model, f, p, x, b)  # fills the memo with the model as it was
    if spelling.change is not None:
        spelling.change(model)
        p = dict(model.named_parameters()) | dict(model.named_buffers())
        result = _run(method, model, f, p, x, b)
        fresh_f, fresh_p = ax.functionalize(copy.deepcopy(model))
        fresh = _run(method, model, fresh_f, fresh_p, x, b)
        if isinstance(fresh, Exception):
            assert isinstance(result, ValueError) and str(result) == str(fresh)
        else:
            assert not isinstance(result, Exception), result
            torch.testing.assert_close(result, fresh, rtol=0, atol=0)  # never the old model's program
    else:
        result = first
    refused = spelling.refused
    if refused is not None:
        assert isinstance(result, ValueError), f"{method} on {spelling.name} should refuse, got a result"
        assert refused in str(result)
        return
    assert not isinstance(result, Exception), f"{method} on {spelling.name}: {result}"
    if method == "conditional":
        result = result[0]
    assert result.shape == x.shape and result.dtype == x.dtype and torch.isfinite(result).all()
    if method in ("deeplift", "deeplift_shap"):
        delta = _expected_delta(method, f, p, x, b)
        torch.testing.assert_close(result.flatten(1).sum(1), delta, rtol=1e-9, atol=1e-9)
    if method == "conditional":
        torch.testing.assert_close(result, ax.lrp(f, p, x, 1), rtol=1e-12, atol=1e-12)


def test_errors_name_the_op() -> None:
    f, p = ax.functionalize(Quantised().double().eval())
    with pytest.raises(ValueError, match=r"aten\.to\.dtype at node .* integer dtype"):
        ax.deeplift(f, p, torch.rand(2, 5, dtype=D), 0)
    model = mlp().double().eval()
    add_hook(model)
    f, p = ax.functionalize(model)
    with pytest.raises(ValueError, match=r"module '2' has a forward hook"):
        ax.lrp(f, p, torch.rand(2, 5, dtype=D), 0)


# ------------------------------------------------------------------------ stale programs


def test_changed_model_is_retraced_for_every_rule_method() -> None:
    # the first case: the memo returned the old model's result with completeness gaps 0.04-0.48
    model = mlp().double().eval()
    f, p = ax.functionalize(model)
    x, b = torch.randn(4, 5, dtype=D), torch.zeros(4, 5, dtype=D)
    ax.deeplift(f, p, x, 1)
    model[1] = nn.Softplus(beta=5)
    attr = ax.deeplift(f, p, x, 1)
    gap = ax.metrics.completeness_delta(f, p, x, 1, attr, baseline=b)
    assert gap.abs().max() < 1e-10


def test_memo_is_bounded() -> None:
    model = mlp().double().eval()
    f, p = ax.functionalize(model)
    for batch in range(1, 30):
        ax.guided_backprop(f, p, torch.randn(batch, 5, dtype=D), 0)
    assert len(f._programs) <= f.memo_size


def test_plain_function_memo_sees_its_closure_change() -> None:
    state = {"slope": 0.1}

    def fn(p, x):
        return F.leaky_relu(x @ p["w"], state["slope"])

    f, _ = ax.functionalize(fn)
    p = {"w": torch.randn(5, 3, dtype=D)}
    x = torch.randn(4, 5, dtype=D)
    ax.deeplift(f, p, x, 1)
    state["slope"] = 0.9
    attr = ax.deeplift(f, p, x, 1)
    torch.testing.assert_close(attr.sum(1), fn(p, x)[:, 1] - fn(p, torch.zeros_like(x))[:, 1])


def test_compiled_explainer_follows_a_changed_model() -> None:
    model = mlp().double().eval()
    f, p = ax.functionalize(model)
    explain = ax.compile(ax.deeplift, f, p, backend="eager")
    x = torch.randn(4, 5, dtype=D)
    explain(x, 1)
    model[1] = nn.Softplus(beta=5)
    torch.testing.assert_close(explain(x, 1), ax.deeplift(f, p, x, 1))


# --------------------------------------------------------------------------- tracing


def test_plain_tensor_attributes_and_closures_trace() -> None:
    model = Scaled().double().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(3, 5, dtype=D)
    attr = ax.deeplift(f, p, x, 2)
    assert ax.metrics.completeness_delta(f, p, x, 2, attr).abs().max() < 1e-10
    w = torch.randn(5, 3, dtype=D)  # a plain function closing over a tensor (API §1)

    def fn(p, x):
        return torch.tanh(x @ w)

    attr = ax.deeplift(fn, {}, x, 0)
    assert ax.metrics.completeness_delta(fn, {}, x, 0, attr).abs().max() < 1e-10


def test_params_without_buffers_trace() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    model[1].running_mean.normal_()
    f, p = ax.functionalize(model)
    x = torch.randn(3, 5, dtype=D)
    weights = dict(model.named_parameters())
    torch.testing.assert_close(ax.deeplift(f, weights, x, 0), ax.deeplift(f, p, x, 0))
    torch.testing.assert_close(ax.lrp(f, weights, x, 0), ax.lrp(f, p, x, 0))


def test_trace_failure_says_why() -> None:
    def branchy(p, x):
        return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="branches on tensor values"):
        ax.deeplift(branchy, {}, torch.randn(2, 3), 0)
    model = nn.Linear(5, 3).double().eval()
    f, p = ax.functionalize(model)
    with pytest.raises(ValueError, match=r"placeholder tensors of x's shape \[\(2, 4\)\].*batch dimension"):
        ax.deeplift(f, p, torch.randn(2, 4, dtype=D), 0)


def test_hooks_are_never_called_with_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    seen: list[type] = []
    model = mlp().double().eval()
    f, p = ax.functionalize(model)
    model[0].register_forward_hook(lambda mod, inp, out: seen.append(type(out)))
    with pytest.raises(ValueError, match="forward hook"):
        ax.deeplift(f, p, torch.randn(2, 5, dtype=D), 0)
    ax.gradient(f, p, torch.randn(2, 5, dtype=D), 0)  # gradient methods call the model for real
    assert seen and not any(issubclass(t, FakeTensor) for t in seen)


# --------------------------------------------------------------------------- threads


def test_first_calls_from_two_threads() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 7 * 7, 4))
    model = model.double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=D)
    expected = ax.deeplift(*ax.functionalize(copy.deepcopy(model)), x, 1)
    for _ in range(3):
        f, p = ax.functionalize(model)
        results: list[Any] = [None] * 4
        barrier = threading.Barrier(4)

        def work(i: int) -> None:
            barrier.wait()
            try:
                results[i] = (ax.deeplift if i % 2 else ax.lrp)(f, p, x, 1)
            except Exception as e:  # noqa: BLE001 - reported below
                results[i] = e

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, r in enumerate(results):
            assert not isinstance(r, Exception), r
            if i % 2:
                torch.testing.assert_close(r, expected)


def test_tracing_leaves_the_module_alone_for_other_threads() -> None:
    # the issue: a concurrent plain net(x) failed 120/383 times while another thread traced
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    x = torch.randn(4, 5, dtype=D)
    want = model(x)
    stop = threading.Event()
    failures: list[BaseException] = []
    calls = [0]

    def plain_calls() -> None:
        while not stop.is_set():
            try:
                with torch.no_grad():
                    out = model(x)
                assert type(out) is torch.Tensor and torch.equal(out, want.detach())
            except BaseException as e:  # noqa: BLE001
                failures.append(e)
            calls[0] += 1

    worker = threading.Thread(target=plain_calls)
    worker.start()
    try:
        for _ in range(8):
            f, p = ax.functionalize(model)  # a fresh memo: every call traces
            ax.deeplift(f, p, x, 0)
            ax.gradient(f, p, x, 0)
    finally:
        stop.set()
        worker.join()
    assert calls[0] > 0 and not failures, failures[:1]


# ----------------------------------------------------------------------- training mode


def _training_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("method", ["gradient", "integrated_gradients", "deeplift", "lrp", "guided_backprop",
                                    "conditional", "smoothgrad"])
def test_training_mode_warns_once_and_writes_no_buffer(method: str) -> None:
    model = _training_model().train()
    before = module_snapshot(model)
    f, p = ax.functionalize(model)
    x = torch.randn(4, 5, dtype=D)
    call = {
        "gradient": lambda: ax.gradient(f, p, x, 0),
        "integrated_gradients": lambda: ax.integrated_gradients(f, p, x, 0, n_steps=4),
        "deeplift": lambda: ax.deeplift(f, p, x, 0),
        "lrp": lambda: ax.lrp(f, p, x, 0),
        "guided_backprop": lambda: ax.guided_backprop(f, p, x, 0),
        "conditional": lambda: ax.conditional(f, p, x, 0, [{"4": [0, 1, 2]}]),
        "smoothgrad": lambda: ax.smoothgrad(f, p, x, 0, n_samples=3, generator=torch.Generator().manual_seed(0)),
    }[method]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except ValueError as e:  # DeepLift has no rule for batch-statistics BatchNorm: a clear refusal is fine
            assert method == "deeplift" and "batch_norm" in str(e)
    mine = [w for w in caught if "training mode" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert "'1' (BatchNorm1d)" in str(mine[0].message) and "'3' (Dropout)" in str(mine[0].message)
    assert_unchanged(model, before)


def test_value_and_attribution_keeps_training_behaviour() -> None:
    model = _training_model().train()
    f, p = ax.functionalize(model)
    before = model[1].running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ax.value_and_attribution(ax.gradient, f, p, torch.randn(4, 5, dtype=D), 0)
    assert not torch.equal(model[1].running_mean, before)  # BatchNorm learns, as in a training step


# ------------------------------------------------------------ review findings (outside testing)

SCALE = 1.0


class ReadsMore(nn.Module):
    """Reads a module-level global, a class attribute, a module in a plain list and a slotted config."""

    k = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.acts = [nn.LeakyReLU(0.1)]
        self.cfg = _Slotted(1.0)
        self.deep = {"a": {"b": {"c": 1.0}}}

    def forward(self, x):
        h = self.acts[0](self.l1(x)) * SCALE * ReadsMore.k * self.cfg.w * self.deep["a"]["b"]["c"]
        return self.l2(h)


class _Slotted:
    __slots__ = ("w",)

    def __init__(self, w: float) -> None:
        self.w = w


def test_what_the_forward_reads_besides_its_module_is_fingerprinted() -> None:
    global SCALE
    model = ReadsMore().double().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(2, 4, dtype=D)

    def fresh():
        return ax.deeplift(*ax.functionalize(copy.deepcopy(model)), x, 1)

    ax.deeplift(f, p, x, 1)
    edits = [lambda: globals().__setitem__("SCALE", 3.0), lambda: setattr(ReadsMore, "k", 2.0),
             lambda: setattr(model.acts[0], "negative_slope", 0.7), lambda: setattr(model.cfg, "w", 0.5),
             lambda: model.deep["a"]["b"].__setitem__("c", 4.0)]
    try:
        for edit in edits:
            edit()
            torch.testing.assert_close(ax.deeplift(f, p, x, 1), fresh(), rtol=0, atol=0)
    finally:
        SCALE, ReadsMore.k = 1.0, 1.0


def test_negative_per_sample_targets_in_rule_methods() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5)).double().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(3, 4, dtype=D)
    for method in (ax.deeplift, ax.lrp, ax.guided_backprop, ax.deconvnet):
        want = method(f, p, x, torch.tensor([4, 0, 3]))
        for t in ([-1, 0, -2], torch.tensor([-1, 0, -2])):
            torch.testing.assert_close(method(f, p, x, t), want, rtol=0, atol=0)
        torch.testing.assert_close(method(f, p, x, torch.tensor(-1)), method(f, p, x, 4), rtol=0, atol=0)


class Ops(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.l1, self.l2, self.op = nn.Linear(4, 6), nn.Linear(6, 3), op

    def forward(self, x):
        h = self.l1(x)
        if self.op == "floordiv":
            h = torch.div(h, 0.5, rounding_mode="floor")
        elif self.op == "viewint":
            h = h.view(torch.int64).to(h.dtype)
        elif self.op == "round":
            h = torch.round(h)
        elif self.op == "index":
            h = h[:, torch.tensor([5, 0, 1, 2, 3, 4])]
        elif self.op == "tensor_split":
            h = torch.cat(torch.tensor_split(h, 3, dim=1)[::-1], 1)
        return self.l2(torch.relu(h))


@pytest.mark.parametrize("op, refused", [("floordiv", "div.Tensor_mode"), ("viewint", "view.dtype"), ("round", "round"),
                                         ("index", None), ("tensor_split", None)])
def test_piecewise_constant_ops_are_refused_and_linear_ones_are_not(op: str, refused: str | None) -> None:
    f, p = ax.functionalize(Ops(op).double().eval())
    x = torch.randn(2, 4, dtype=D)
    for method in (ax.deeplift, ax.lrp, ax.guided_backprop, ax.deconvnet):
        if refused:
            with pytest.raises(ValueError, match=refused):
                method(f, p, x, 1)
        else:
            attr = method(f, p, x, 1)
            if method is ax.deeplift:
                assert ax.metrics.completeness_delta(f, p, x, 1, attr).abs().max() < 1e-12


def test_pre_hook_on_the_root_is_named_as_such() -> None:
    model = mlp().double().eval()
    model.register_forward_pre_hook(lambda mod, args: None)
    f, p = ax.functionalize(model)
    with pytest.raises(ValueError, match="the root module has a forward pre-hook"):
        ax.deeplift(f, p, torch.randn(2, 5, dtype=D), 0)


def test_forward_args_that_cannot_follow_the_rows_are_refused() -> None:
    f, p = ax.functionalize(mlp().double().eval())

    def fn(params, x, scale):
        return f(params, x * scale)

    x, scale = torch.randn(3, 5, dtype=D), torch.rand(3, 1, dtype=D) + 0.5
    with pytest.raises(ValueError, match="not copies of the batch"):
        ax.integrated_gradients(fn, p, x, 1, n_steps="auto", additional_forward_args=(scale,))
    got = ax.integrated_gradients(fn, p, x, 1, n_steps=8, additional_forward_args={"scale": scale})
    torch.testing.assert_close(got, ax.integrated_gradients(fn, p, x, 1, n_steps=8, additional_forward_args=(scale,)))


def test_compiled_explainer_raises_the_methods_own_errors() -> None:
    f, p = ax.functionalize(mlp().double().eval())
    explain = ax.compile(ax.deeplift, f, p, backend="eager")
    x = torch.randn(3, 5, dtype=D)
    with pytest.raises(ValueError, match=r"target has 2 entries but the batch has 3 samples \(output shape \(3, 3\)\)"):
        explain(x, [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        explain(x, 7)
    torch.testing.assert_close(explain(x, -1), ax.deeplift(f, p, x, 2))


def test_instance_norm_with_running_stats_is_named_in_training_mode() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, track_running_stats=True), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 2)).double().train()
    before = module_snapshot(model)
    f, p = ax.functionalize(model)
    with pytest.warns(UserWarning, match=r"'1' \(InstanceNorm2d\)"):
        ax.gradient(f, p, torch.randn(2, 2, 6, 6, dtype=D), 0)
    assert_unchanged(model, before)


def test_constants_built_in_forward_under_an_enclosing_grad() -> None:
    # a mask made inside forward is wrapped by torch.func.grad while tracing: it is still a constant
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l, self.o = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            mask = torch.ones(x.shape[1], x.shape[1]).triu().to(x.dtype)
            return self.o(torch.relu(self.l(x)) @ mask)

    model = Masked().double().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(3, 4, dtype=D)
    w = {"l.weight": p["l.weight"]}
    for method in (ax.lrp, ax.deeplift):
        g = torch.func.grad(lambda w: method(f, {**p, **w}, x, 1).pow(2).sum())(w)["l.weight"]
        eps = 1e-6
        bump = torch.zeros_like(w["l.weight"])
        bump[1, 2] = eps
        fd = (method(f, {**p, "l.weight": w["l.weight"] + bump}, x, 1).pow(2).sum()
              - method(f, {**p, "l.weight": w["l.weight"] - bump}, x, 1).pow(2).sum()) / (2 * eps)
        torch.testing.assert_close(g[1, 2], fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal"])
def test_parametrized_modules_are_explained_as_their_plain_equivalent(kind: str) -> None:
    """torch.nn.utils.parametrizations (weight_norm, orthogonal): the shadow copy used to crash (parametrized
    modules refuse copy.copy); the methods now equal the same model with the computed weight written in."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    first = nn.Linear(4, 4)
    first = parametrizations.weight_norm(first) if kind == "weight_norm" else parametrizations.orthogonal(first)
    m = nn.Sequential(first, nn.ReLU(), nn.Linear(4, 3)).double().eval()
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    with torch.no_grad():
        plain[0].weight.copy_(m[0].weight)
        plain[0].bias.copy_(m[0].bias)
        plain[2].load_state_dict(m[2].state_dict())
    snap = module_snapshot(m)
    f, p = ax.functionalize(m)
    g, q = ax.functionalize(plain)
    x = torch.randn(5, 4, dtype=D, generator=torch.Generator().manual_seed(1))
    for method in (ax.saliency, ax.integrated_gradients, ax.lrp, ax.deeplift):
        torch.testing.assert_close(method(f, p, x, 1), method(g, q, x, 1), rtol=1e-10, atol=1e-12)
    # the parametrization's own parameters are the params: gradients reach them, and new values are used
    name = next(k for k in p if "original" in k)
    leaf = p[name].detach().requires_grad_()
    (grad,) = torch.autograd.grad(f({**p, name: leaf}, x).sum(), leaf)
    assert grad.abs().sum() > 0
    moved = {**p, name: p[name] + 0.1}
    assert not torch.allclose(f(moved, x), f(p, x))
    assert_unchanged(m, snap)


@pytest.mark.filterwarnings("ignore::UserWarning")  # (training mode is warned about)
def test_an_out_argument_writes_into_no_buffer_of_the_users() -> None:
    """spectral_norm in training mode runs its power iteration with out= into its _u/_v buffers: a rule method's
    program wrote the user's buffers (found in review). Programs now compute those ops without out=."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    parametrizations.spectral_norm(net[0])
    net.train()
    snap = module_snapshot(net)
    f, p = ax.functionalize(net)
    x = torch.randn(6, 4, dtype=D, generator=torch.Generator().manual_seed(1))
    for method in (ax.lrp, ax.deeplift, ax.saliency):
        attr = method(f, p, x, 1)
        assert_unchanged(net, snap)
    # DeepLift is complete against the model as eager calls run it (the same power iteration from the same _u)
    gap = f(p, x)[:, 1] - f(p, torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(ax.deeplift(f, p, x, 1).sum(1), gap, rtol=1e-9, atol=1e-10)
    assert attr.shape == x.shape


class _DeepConfig(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.cfg = {"a": {"b": {"c": {"d": 2.0}}}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x) * self.cfg["a"]["b"]["c"]["d"])


def test_a_value_deep_in_an_attribute_is_part_of_the_fingerprint() -> None:
    """A value four levels down an attribute (self.cfg["a"]["b"]["c"]["d"]) changed and the old program was served:
    attributes are fingerprinted by content to depth 8 now (found in review)."""
    m = _DeepConfig().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 4, dtype=D)
    before = ax.lrp(f, p, x, 0)
    m.cfg["a"]["b"]["c"]["d"] = 5.0
    after = ax.lrp(f, p, x, 0)
    fresh, q = ax.functionalize(m)
    torch.testing.assert_close(after, ax.lrp(fresh, q, x, 0))
    assert not torch.allclose(before, after)


def test_compiled_explainer_follows_what_its_guards_cannot_see() -> None:
    """ax.compile rebuilt its graph when the fingerprint changed, but dynamo keeps graphs on the code object and its
    guards do not see a global or a value read inside the traced program: the rebuilt explainer was served the
    old graph (deeplift off by 0.2 after a global slope changed)."""
    global SCALE
    model = ReadsMore().double().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(2, 4, dtype=D)
    explainers = {m: ax.compile(m, f, p, backend="eager") for m in (ax.deeplift, ax.lrp)}
    for m, explain in explainers.items():
        explain(x, 1)
    try:
        for edit in (lambda: globals().__setitem__("SCALE", 3.0), lambda: setattr(model.cfg, "w", 0.5)):
            edit()
            for m, explain in explainers.items():
                torch.testing.assert_close(explain(x, 1), m(f, p, x, 1), rtol=0, atol=0)
    finally:
        SCALE = 1.0


class _Noisy(nn.Module):
    """Adds noise drawn at every forward (global RNG, or the module's own generator)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.generator = generator

    def forward(self, x):
        noise = torch.randn(x.shape[0], 8, dtype=x.dtype, generator=self.generator)
        return self.l2(torch.tanh(self.l1(x) + 0.5 * noise))


@pytest.mark.parametrize("own_generator", [False, True])
def test_a_draw_in_the_forward_is_drawn_at_every_call(own_generator: bool) -> None:
    """The tracer folded ``0.5 * randn(...)`` into a constant (the product reads no traced value), so DeepLift and
    LRP gave one answer for every seed: the draw of the trace, frozen into the program."""
    g = torch.Generator().manual_seed(0) if own_generator else None
    torch.manual_seed(0)
    f, p = ax.functionalize(_Noisy(g).double().eval())
    x = torch.randn(3, 4, dtype=D)

    def seeded(s: int) -> None:
        (g.manual_seed(s) if g is not None else torch.manual_seed(s))

    for method in (ax.deeplift, ax.lrp, ax.guided_backprop):
        seeded(1)
        a = method(f, p, x, 1)
        seeded(1)
        torch.testing.assert_close(method(f, p, x, 1), a, rtol=0, atol=0)
        seeded(2)
        assert (method(f, p, x, 1) - a).abs().max() > 1e-6, method.__name__
    seeded(3)
    got = ax.gradient(f, p, x, 1)
    seeded(3)
    xx = x.clone().requires_grad_()
    f.module(xx)[:, 1].sum().backward()
    torch.testing.assert_close(got, xx.grad, rtol=1e-12, atol=1e-14)


class _Base(nn.Module):
    SHIFT = 1.0


_settings = __import__("types").ModuleType("user_settings")  # a user's config module (``import settings``)
_settings.GAIN = 1.0
_NESTED = {"model": {"head": {"scale": 1.0}}}


class _Config:
    BIAS = 0.0


_OPTIONS = __import__("argparse").Namespace(slope=1.0)  # argparse's (a standard-library type) as scripts keep them


def _shifted(h):  # a module-level helper reading a config class and a config object
    return h * _OPTIONS.slope + _Config.BIAS


def _factory() -> tuple[nn.Module, Callable[[float], None]]:
    factor = 1.0

    class ReadsEverywhere(_Base):
        def __init__(self) -> None:
            super().__init__()
            import numpy as np

            self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
            self.weights = np.ones(6, dtype=np.float32)
            self.offset = torch.zeros(6)

            self.extra = [nn.Sequential(nn.LeakyReLU(0.1))]  # a module outside the tree, its setting on a child

        def scaled(self, h):  # a helper method naming a global
            return h * _NESTED["model"]["head"]["scale"]

        @property
        def gain(self):  # a property reading a config module
            return _settings.GAIN

        def forward(self, x):
            h = self.extra[0](self.l1(x)) * self.SHIFT * self.gain * factor
            h = self.scaled(h) * torch.from_numpy(self.weights).to(x.dtype) + self.offset.to(x.dtype)
            return self.l2(torch.tanh(_shifted(h)))

    def set_factor(v: float) -> None:
        nonlocal factor
        factor = v

    return ReadsEverywhere(), set_factor


def test_values_a_forward_reads_outside_its_module_tree_are_fingerprinted() -> None:
    # each edit below was served the old program (found by outside testers): an attribute inherited from a base
    # class, a config module's and a config class's attribute (read by a property, a helper), a global dict three
    # levels down read by a helper method, the closure of a class built in a factory, a numpy attribute and a tensor
    # attribute edited in place (.data: no version bump), a module kept in a list, a method replaced on the class
    model, set_factor = _factory()
    model = model.double().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(2, 4, dtype=D)

    def fresh(method):
        return method(*ax.functionalize(model), x, 1)

    for method in (ax.deeplift, ax.gradient):
        for _ in range(3):  # gradient methods run a traced program from their third call
            method(f, p, x, 1)
    edits = [lambda: setattr(_Base, "SHIFT", 2.0), lambda: setattr(_settings, "GAIN", 0.5),
             lambda: setattr(_Config, "BIAS", 0.25), lambda: _NESTED["model"]["head"].__setitem__("scale", 3.0),
             lambda: set_factor(0.7), lambda: model.weights.__setitem__(2, -1.0),
             lambda: model.offset.data.__setitem__(1, 0.5), lambda: setattr(model.extra[0][0], "negative_slope", 0.3),
             lambda: setattr(type(model), "scaled", lambda self, h: h * 0.5), lambda: setattr(_OPTIONS, "slope", 2.0)]
    try:
        for edit in edits:
            edit()
            for method in (ax.deeplift, ax.gradient, ax.lrp):
                torch.testing.assert_close(method(f, p, x, 1), fresh(method), rtol=0, atol=0)
    finally:
        _Base.SHIFT, _settings.GAIN, _Config.BIAS, _OPTIONS.slope = 1.0, 1.0, 0.0, 1.0
        _NESTED["model"]["head"]["scale"] = 1.0


def test_the_encoder_fast_path_is_named_with_the_way_around_it() -> None:
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self, nested: bool) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.enc, self.head = nn.TransformerEncoder(layer, 1, enable_nested_tensor=nested), nn.Linear(8, 3)

        def forward(self, x, pad):
            return self.head(self.enc(x, src_key_padding_mask=pad)[:, 0])

    x, pad = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    with pytest.raises(ax.rewrite.UnsupportedOperation, match="inference fast path.*enable_nested_tensor=False"):
        ax.deeplift(*ax.functionalize(Encoder(True).eval()), x, 1, additional_forward_args=(pad,))
    f, p = ax.functionalize(Encoder(False).eval())
    attr = ax.deeplift(f, p, x, 1, additional_forward_args=(pad,))
    torch.testing.assert_close(attr.sum((1, 2)), (f(p, x, pad) - f(p, torch.zeros_like(x), pad))[:, 1], rtol=1e-4,
                               atol=1e-5)
    assert attr[0, 3:].abs().max() == 0
