"""attrax.testing: strategies and axiom checks, used the way a user would."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attrax as ax
from attrax.testing import (
    check_batch_invariance,
    check_completeness,
    check_dummy,
    check_implementation_invariance,
    check_linearity,
    mlps,
    permuted,
    relu_cnns,
)


@settings(max_examples=15)
@given(case=mlps(activations=("tanh", "softplus")))
def test_axioms_hold_for_integrated_gradients(case):
    ig = lambda f, p, x, t, **kw: ax.integrated_gradients(f, p, x, t, n_steps=64, **kw)  # noqa: E731
    check_completeness(case, ig(case.model_fn, case.params, case.x, case.target), rtol=1e-4, atol=1e-8)
    check_batch_invariance(ig, case)
    check_dummy(ig, case, feature=0)
    if len(case.info["widths"]) >= 2:
        check_implementation_invariance(ig, case, permuted(case))


@settings(max_examples=10)
@given(case=relu_cnns(), method=st.sampled_from([ax.deeplift, ax.lrp, ax.occlusion]))
def test_batch_invariance_and_dummy_for_rule_and_perturbation_methods(case, method):
    kw = {"window": 1} if method is ax.occlusion else {}
    check_batch_invariance(method, case, **kw)
    check_dummy(method, case, feature=1, **kw)


@settings(max_examples=10)
@given(seed=st.integers(0, 1000))
def test_linearity_of_gradient_methods(seed):
    f_case = _fixed_case(seed)
    g_case = _fixed_case(seed + 1)
    check_linearity(ax.input_x_gradient, f_case, g_case)
    check_linearity(lambda f, p, x, t: ax.integrated_gradients(f, p, x, t, n_steps=16), f_case, g_case)


def _fixed_case(seed):
    from torch import nn

    from attrax.testing import _finish

    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return _finish(module, (2, 4), 3, seed, torch.float64, {})


def test_checks_fail_when_the_axiom_fails():
    case = _fixed_case(0)
    with pytest.raises(AssertionError, match="completeness violated"):
        check_completeness(case, torch.zeros_like(case.x))
    with pytest.raises(AssertionError, match="dummy feature"):
        check_dummy(lambda f, p, x, t: torch.ones_like(x), case)
