import numpy as np
import pytest
import torch

import attrax as ax
from attrax.targets import check_target, select


OUT = torch.arange(24.0).reshape(4, 6)


def sel(t, out=OUT):
    return select(out, check_target(t, out.shape[0]))


def test_int_target():
    assert torch.equal(sel(2), OUT[:, 2])
    assert torch.equal(sel(-1), OUT[:, 5])


def test_per_sample_targets_all_spellings():
    want = OUT[torch.arange(4), torch.tensor([0, 5, 2, 3])]
    for t in ([0, 5, 2, 3], (np.array([0, 5, 2, 3])), torch.tensor([0, 5, 2, 3])):
        assert torch.equal(sel(t), want)


def test_tuple_target_indexes_non_batch_dims():
    out = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    assert torch.equal(sel((1, 2), out), out[:, 1, 2])


def test_callable_and_none_targets():
    assert torch.equal(sel(lambda o: o[:, 1] - o[:, 0]), OUT[:, 1] - OUT[:, 0])
    assert torch.equal(sel(None, OUT[:, :1]), OUT[:, 0])
    assert torch.equal(sel(None, OUT[:, 0]), OUT[:, 0])


def test_zero_dim_tensor_target():
    assert torch.equal(sel(torch.tensor(3)), OUT[:, 3])


@pytest.mark.parametrize(
    "target, exc, match",
    [
        (6, ValueError, r"target 6 is out of range for output of shape \(4, 6\)"),
        ([1, 2], ValueError, "target has 2 entries but the batch has 4"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "target tensor must hold integers"),
        (None, ValueError, r"target is None but the output has shape \(4, 6\)"),
        (torch.tensor([0, 1, 2, 9]), ValueError, r"target values must lie in \[0, 6\) for output of shape \(4, 6\)"),
        ((1, 2), ValueError, r"target tuple \(1, 2\) has 2 indices but the output of shape \(4, 6\)"),
        (True, TypeError, "got bool"),
        ("cat", TypeError, "target must be"),
        (lambda o: o, ValueError, r"callable target must return one scalar per sample, shape \(4,\)"),
        (1.5, TypeError, "target must be"),
    ],
)
def test_bad_targets_raise_naming_target_and_shape(target, exc, match):
    with pytest.raises(exc, match=match):
        sel(target)


def test_bad_target_raised_before_backward():
    calls = []

    def model_fn(p, x):
        calls.append(1)
        return x @ torch.ones(3, 2)

    with pytest.raises(ValueError, match="out of range"):
        ax.integrated_gradients(model_fn, {}, torch.randn(4, 3), 7, n_steps=64, chunk_size=8)
    assert len(calls) == 1  # one chunk forward, no backward, no further chunks
    with pytest.raises(ValueError, match="target has 3 entries"):
        ax.integrated_gradients(model_fn, {}, torch.randn(4, 3), [0, 1, 1])
    assert len(calls) == 1  # length errors need no model call at all
