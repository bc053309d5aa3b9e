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
