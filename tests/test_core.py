import threading

import pytest
import torch
from torch import nn

import attrax as ax
from conftest import assert_unchanged, module_snapshot


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).eval()


def test_functionalize_matches_module_and_shares_storage():
    m = net()
    model_fn, params = ax.functionalize(m)
    x = torch.randn(5, 4)
    assert torch.equal(model_fn(params, x), m(x))
    assert set(params) == {k for k, _ in m.named_parameters()} | {k for k, _ in m.named_buffers()}
    for k, v in m.state_dict(keep_vars=True).items():
        assert params[k] is v  # no copies


def test_params_are_inputs_not_module_state():
    m = net()
    model_fn, params = ax.functionalize(m)
    x = torch.randn(5, 4)
    other = {k: v * 2 if v.is_floating_point() else v for k, v in params.items()}
    before = module_snapshot(m)
    y = model_fn(other, x)
    assert not torch.allclose(y, m(x))
    assert_unchanged(m, before)


def test_gradients_wrt_params_reach_the_model():
    m = net()
    model_fn, params = ax.functionalize(m)
    x = torch.randn(5, 4)
    weights = dict(m.named_parameters())  # differentiate w.r.t. parameters; buffers ride along
    g = torch.func.grad(lambda p: model_fn({**params, **p}, x).sum())(weights)
    m.zero_grad()
    m(x).sum().backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(g[k], p.grad)


def test_functionalize_plain_function():
    fn = lambda p, x: (x * 2).sum(1)  # noqa: E731
    model_fn, params = ax.functionalize(fn)
    assert params == {}
    assert torch.equal(model_fn(params, torch.ones(2, 3)), torch.full((2,), 6.0))


def test_functionalize_rejects_non_callable():
    with pytest.raises(TypeError, match="module must be"):
        ax.functionalize(3)


def test_methods_reject_a_module_as_model_fn():
    with pytest.raises(TypeError, match="functionalize"):
        ax.gradient(net(), {}, torch.randn(2, 4), 0)


def test_concurrent_calls_from_threads_are_safe():
    m = net().double()
    model_fn, params = ax.functionalize(m)
    x = torch.randn(6, 4, dtype=torch.float64)

    weights = dict(m.named_parameters())

    def loss(p, t):
        return (ax.input_x_gradient(model_fn, {**params, **p}, x, t) ** 2).sum()

    expected = [torch.func.grad(loss)(weights, t) for t in range(3)]
    results = [None] * 12
    errors = []

    def work(i):
        try:
            results[i] = torch.func.grad(loss)(weights, i % 3)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i, r in enumerate(results):
        for k in r:
            torch.testing.assert_close(r[k], expected[i % 3][k])


# ------------------------------------------------- issue 15 ("Trust"), items 12 and 21: checks


def test_unknown_params_key_is_an_error_naming_it_with_a_suggestion():
    m = net()
    model_fn, params = ax.functionalize(m)
    x = torch.randn(3, 4)
    bad = {**params, "0.weigth": params["0.weight"] * 2}  # used to be silently ignored
    with pytest.raises(ValueError, match=r"params has key '0.weigth' \(did you mean '0.weight'\?\) that name"):
        ax.gradient(model_fn, bad, x, 0)
    with pytest.raises(ValueError, match="'0.weigth'"):
        ax.integrated_gradients(model_fn, bad, x, 0, n_steps=4)
    with pytest.raises(ValueError, match=r"'zzz'.*and 1 more"):
        ax.gradient(model_fn, {**params, "zzz": x, "a": x, "b": x, "c": x}, x, 0)


def test_params_missing_buffers_or_holding_tied_names_still_work():
    m = net()
    model_fn, params = ax.functionalize(m)
    x = torch.randn(3, 4)
    weights = dict(m.named_parameters())  # no BatchNorm buffers: the module's own are used
    torch.testing.assert_close(ax.gradient(model_fn, weights, x, 0), ax.gradient(model_fn, params, x, 0))
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).eval()
    tied[1].weight = tied[0].weight
    f, _ = ax.functionalize(tied)
    full = dict(tied.named_parameters(remove_duplicate=False))  # both names of the shared weight
    assert ax.gradient(f, full, torch.randn(2, 3), 0).shape == (2, 3)


def test_plain_functions_skip_the_key_check():
    fn = lambda p, x: x * p["w"]  # noqa: E731
    out = ax.gradient(fn, {"w": torch.ones(3), "unused": torch.ones(1)}, torch.randn(2, 3), 0)
    assert out.shape == (2, 3)


def test_dtype_mismatch_names_both_dtypes():
    model_fn, params = ax.functionalize(net())  # float32
    x = torch.randn(3, 4, dtype=torch.float64)  # used to fail deep inside with a raw matmul dtype error
    for call in (
        lambda: ax.gradient(model_fn, params, x, 0),
        lambda: ax.integrated_gradients(model_fn, params, x, 0, n_steps=4),
        lambda: ax.smoothgrad(model_fn, params, x, 0, n_samples=2),
    ):
        with pytest.raises(TypeError, match=r"x has dtype torch.float64 but params hold dtype torch.float32"):
            call()


def test_dtype_mix_the_model_handles_is_fine():
    fn = lambda p, x: (x.double() * p["w"]).sum(1)  # noqa: E731 - float32 x, float64 params, cast inside
    g = ax.gradient(fn, {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}, torch.ones(2, 2), None)
    torch.testing.assert_close(g, torch.tensor([[1.0, 2.0], [1.0, 2.0]]))


@pytest.mark.parametrize(
    "baseline, match",
    [
        (torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), "baseline must be finite"),
        (float("inf"), "baseline must be finite, got inf"),
        ((torch.zeros(1, 4), torch.full((1, 2), float("-inf"))), r"baseline\[1\] must be finite"),
    ],
)
def test_baselines_must_be_finite_like_x(baseline, match):
    from attrax.core import baselines_for

    xs = (torch.zeros(3, 4),) if not isinstance(baseline, tuple) else (torch.zeros(3, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=match):
        baselines_for(baseline, xs)
    assert all(b.shape == x.shape for b, x in zip(baselines_for(baseline, xs, check_finite=False), xs))


def test_value_checks_skip_captured_constants_while_tracing():
    # a real baseline tensor captured by make_fx/export tracing is not concrete: checking it for
    # NaN would guard on a data-dependent value (ax.export of deeplift_shap failed that way)
    from torch.fx.experimental.proxy_tensor import make_fx

    model_fn, params = ax.functionalize(net())
    const = torch.zeros(1, 4)
    gm = make_fx(lambda x: ax.integrated_gradients(model_fn, params, x, 0, baseline=const, n_steps=2),
                 tracing_mode="symbolic", _allow_non_fake_inputs=True)(torch.randn(2, 4))
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), ax.integrated_gradients(model_fn, params, x, 0, baseline=const, n_steps=2))


WATCHED_SCALE = 1.0


class _Cfg:
    def __init__(self) -> None:
        self.slope, self.extra = 0.1, {"a": {"b": 1.0}}


class _Watched(nn.Module):
    k = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.cfg, self.names, self.tags, self.t = _Cfg(), [1, 2], {"x"}, torch.ones(6)

    def forward(self, x):
        return self.l2(torch.nn.functional.leaky_relu(self.l1(x), self.cfg.slope) * self.t * WATCHED_SCALE * self.k)


def test_watched_fingerprint_equals_the_full_one_after_every_kind_of_edit() -> None:
    """FunctionalModel.fingerprint() re-checks what the last full fingerprint read (core._Watch) instead of
    computing it again: after each edit it must equal the full computation, and differ from before."""
    from attrax.core import module_fingerprint

    global WATCHED_SCALE
    model = _Watched()
    f, _ = ax.functionalize(model)
    sub = type("_WatchedSub", (_Watched,), {})
    edits = {
        "scalar": lambda: setattr(model.cfg, "slope", 0.2),
        "nested dict": lambda: model.cfg.extra["a"].__setitem__("b", 2.0),
        "list": lambda: model.names.append(3),
        "set": lambda: model.tags.add("y"),
        "tensor in place": lambda: model.t.mul_(2),
        "class attribute": lambda: setattr(_Watched, "k", 2.0),
        "global": lambda: globals().__setitem__("WATCHED_SCALE", 2.0),
        "hook": lambda: model.l1.register_forward_hook(lambda *a: None),
        "parameter replaced": lambda: setattr(model.l1, "weight", nn.Parameter(model.l1.weight.detach().clone())),
        "training": lambda: model.l2.train(not model.l2.training),
        "child replaced": lambda: setattr(model, "l2", nn.Linear(6, 3)),
        "class swapped": lambda: setattr(model, "__class__", sub),
        "forward on the instance": lambda: setattr(model.l1, "forward", lambda x: x),
        "attribute renamed": lambda: (setattr(model.cfg, "other", model.cfg.__dict__.pop("extra"))),
        "tensor memory swapped": lambda: setattr(model.t, "data", torch.full((6,), 3.0)),  # no version bump
        "forward code swapped": lambda: setattr(_Watched.forward, "__code__", _watched_forward_2.__code__),
    }
    try:
        for name, edit in edits.items():
            before = f.fingerprint()
            assert f.fingerprint() is before and f.__dict__["_watched"] is not None, name  # the watched path
            edit()
            after = f.fingerprint()
            assert after != before, name
            assert after == module_fingerprint(model), name
    finally:
        WATCHED_SCALE, _Watched.k = 1.0, 1.0
        _Watched.forward.__code__ = _WATCHED_CODE


_WATCHED_CODE = _Watched.forward.__code__


def _watched_forward_2(self, x):
    return self.l2(torch.nn.functional.leaky_relu(self.l1(x), self.cfg.slope) * self.t * WATCHED_SCALE * self.k * 2)


def test_a_program_traced_while_the_model_changes_is_not_memoised() -> None:
    """Another thread may change the module while a program is traced for the fingerprint taken before: the
    program (possibly of the new state) must not be stored under the old fingerprint (a reviewer's race)."""
    from attrax.rewrite import memoised

    model = nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3)).eval()
    f, _ = ax.functionalize(model)

    def compute():
        model[1].negative_slope = 0.5  # the change lands while the value is computed
        return "traced"

    assert memoised(f, "key", compute) == "traced"
    model[1].negative_slope = 0.1  # back to the state the fingerprint was taken in
    assert memoised(f, "key", lambda: "again") == "again"  # not served what was traced meanwhile


def test_fingerprint_is_computed_once_per_method_call(monkeypatch) -> None:
    import attrax.core as core

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    f, p = ax.functionalize(model)
    x = torch.randn(2, 4)
    ax.lrp(f, p, x, 1)
    calls = []
    real = core.FunctionalModel._fingerprint_now
    monkeypatch.setattr(core.FunctionalModel, "_fingerprint_now", lambda self: calls.append(1) or real(self))
    for method in (ax.lrp, ax.deeplift, ax.guided_backprop):
        calls.clear()
        method(f, p, x, 1)
        assert len(calls) == 1, method
    model[0].weight.data.mul_(1)  # values are not part of it; structure is:
    model[1] = nn.Tanh()
    calls.clear()
    torch.testing.assert_close(ax.deeplift(f, p, x, 1), ax.deeplift(*ax.functionalize(model), x, 1))
