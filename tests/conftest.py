import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("ATTRAX_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("ATTRAX_HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def module_snapshot(module: torch.nn.Module) -> dict:
    """Everything about a module that attribution must leave untouched."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in module.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in module.named_parameters()},
        "training": [m.training for m in module.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(getattr(m, "_backward_pre_hooks", {})))
            for m in module.modules()
        ],
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in module.named_parameters()},
    }


def assert_unchanged(module: torch.nn.Module, before: dict) -> None:
    after = module_snapshot(module)
    assert before["ids"] == after["ids"]
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{k} changed"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    for k, g in before["grads"].items():
        a = after["grads"][k]
        assert (g is None and a is None) or torch.equal(g, a), f"grad of {k} changed"


def assert_grad_matches_finite_differences(loss, weights: dict, per_tensor: int = 3, rtol: float = 1e-5,
                                           eps: float = 1e-6) -> None:
    """``torch.func.grad(loss)`` at ``weights`` equals central differences at random entries (float64)."""
    grads = torch.func.grad(loss)(weights)
    gen = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        for _ in range(per_tensor):
            idx = tuple(int(torch.randint(s, (1,), generator=gen)) for s in w.shape)
            plus = {k: v.detach().clone() for k, v in weights.items()}
            minus = {k: v.detach().clone() for k, v in weights.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            with torch.no_grad():
                fd = float((loss(plus) - loss(minus)) / (2 * eps))
            got = float(grads[name][idx].detach())
            assert abs(got - fd) <= 1e-6 + rtol * abs(fd), (name, idx, got, fd)


@pytest.fixture
def snapshot():
    return module_snapshot
