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
        (torch.tensor([0, 1, 2, 9]), ValueError, r"target values must lie in \[-6, 6\) for output of shape \(4, 6\)"),
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
    rows = []

    def model_fn(p, x):
        rows.append(x.shape[0])
        return x @ torch.ones(3, 2)

    with pytest.raises(ValueError, match=r"target 7 is out of range for output of shape \(4, 2\)"):
        ax.integrated_gradients(model_fn, {}, torch.randn(4, 3), 7, n_steps=64, chunk_size=8)
    assert rows == [1]  # one row evaluated (no grad) to learn the output shape; no chunk, no backward
    rows.clear()
    with pytest.raises(ValueError, match=r"target has 3 entries but the batch has 4 samples \(output shape \(4, 2\)\)"):
        ax.integrated_gradients(model_fn, {}, torch.randn(4, 3), [0, 1, 1])
    assert rows == [1]  # only to name the output shape in the message


# Regressions from issue 15 ("Trust"), items 20 and 21.

def plain_linear(p, x):
    return x @ p["w"]


PLAIN = {"w": torch.randn(3, 3, generator=torch.Generator().manual_seed(0))}
X4 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "call",
    [
        lambda t: ax.smoothgrad(plain_linear, PLAIN, X4, t, n_samples=50),
        lambda t: ax.integrated_gradients(plain_linear, PLAIN, X4, t),
        lambda t: ax.noise_tunnel(ax.integrated_gradients, plain_linear, PLAIN, X4, t, n_samples=3, n_steps=4),
        lambda t: ax.gradient_shap(plain_linear, PLAIN, X4, t, torch.zeros(2, 3), n_samples=7),
        lambda t: ax.metrics.deletion_curve(plain_linear, PLAIN, X4, t, X4, steps=5),
    ],
)
def test_target_errors_name_the_output_shape_of_the_users_call(call):
    # these methods fold steps/samples into the batch; the errors used to name the folded output,
    # e.g. "output of shape (200, 3)" for smoothgrad on a batch of 4
    with pytest.raises(ValueError, match=r"target 9 is out of range for output of shape \(4, 3\) \(expected -3 <= target < 3\)"):
        call(9)
    with pytest.raises(ValueError, match=r"target values must lie in \[-3, 3\) for output of shape \(4, 3\), got min 0 and max 5"):
        call(torch.tensor([0, 5, 1, 2]))
    with pytest.raises(ValueError, match=r"target has 2 entries but the batch has 4 samples \(output shape \(4, 3\)\)"):
        call([0, 1])
    with pytest.raises(TypeError, match=r"target tensor must hold integers .* got dtype torch.float32 \(output shape \(4, 3\)\)"):
        call(torch.zeros(4))
    with pytest.raises(ValueError, match=r"target is None but the output has shape \(4, 3\)"):
        call(None)
    with pytest.raises(ValueError, match=r"callable target must return one scalar per sample, shape \(4,\); got \(4, 3\) for output of shape \(4, 3\)"):
        call(lambda o: o)


def test_plain_function_bad_target_rejected_before_heavy_work():
    rows = []

    def f(p, x):
        rows.append(x.shape[0])
        return x @ p["w"]

    with pytest.raises(ValueError, match=r"out of range for output of shape \(4, 3\)"):
        ax.integrated_gradients(f, PLAIN, X4, 9, n_steps=5000)  # used to evaluate 20 000 points first
    assert rows == [1]


def test_select_on_folded_output_names_the_users_shape():
    # select sees 50 stacked copies of a batch of 4; the message speaks of the user's output
    t = check_target(7, 4)
    with pytest.raises(ValueError, match=r"target 7 is out of range for output of shape \(4, 6\)"):
        select(torch.zeros(200, 6), t)


NEG = [-1, [-1, -1, -1, -1], np.array([-1, -1, -1, -1]), torch.tensor([-1, -1, -1, -1]), torch.tensor(-1)]


@pytest.mark.parametrize("t", NEG, ids=["int", "list", "ndarray", "tensor", "0-d"])
def test_negative_targets_count_from_the_end_for_every_spelling(t):
    # one rule, Python's (-C <= t < C), for ints, sequences and tensors; tensor([-1]) was rejected
    assert torch.equal(sel(t), OUT[:, 5])
    f = lambda p, x: x @ torch.eye(3)  # noqa: E731
    x = torch.randn(4, 3)
    torch.testing.assert_close(ax.gradient(f, {}, x, t), torch.tensor([0.0, 0.0, 1.0]).expand(4, 3))


def test_mixed_negative_per_sample_targets():
    assert torch.equal(sel([0, -1, -6, 5]), OUT[torch.arange(4), torch.tensor([0, 5, 0, 5])])


@pytest.mark.parametrize("t", [-7, [0, -7, 1, 2], torch.tensor([0, -7, 1, 2]), torch.tensor(6)])
def test_out_of_range_below_and_above(t):
    with pytest.raises(ValueError, match=r"\(4, 6\)"):
        sel(t)


def test_target_checked_once_up_front_is_not_rechecked_per_chunk():
    # prepare_call validated the tensor target against the output shape, so select skips the
    # per-call value check (a device sync on accelerators)
    from attrax.targets import prepare_call

    *_, t = prepare_call(plain_linear, PLAIN, X4, torch.tensor([0, 1, 2, -1]), check_output=True)
    assert t.checked and t.batch == 4
    *_, t = prepare_call(plain_linear, PLAIN, X4, torch.tensor([0, 1, 2, -1]))  # no probe unless asked
    assert not t.checked
