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


@pytest.fixture
def snapshot():
    return module_snapshot
