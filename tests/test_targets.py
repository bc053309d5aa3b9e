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
    # a target closing over one index per sample, given the folded batch: named as such (was "(4,); got (4,)")
    idx = torch.tensor([0, 2, 1, 0])
    with pytest.raises(ValueError, match=r"callable target must return one scalar per") as e:
        call(lambda o: o.gather(1, idx[:, None])[:, 0])
    assert "(4,); got (4,)" not in str(e.value)


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


# Issue 18: the target spellings Captum users reach for.


def grid_model():
    """(B, 3) -> (B, 2, 3) outputs, so per-sample targets are index tuples."""
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Unflatten(1, (2, 3))).double().eval()
    return net, *ax.functionalize(net)


def test_length_one_target_tensor_broadcasts_over_the_batch():
    assert torch.equal(sel(torch.tensor([3])), OUT[:, 3])
    assert torch.equal(sel(torch.tensor([-1])), OUT[:, 5])
    with pytest.raises(ValueError, match=r"target values must lie in \[-6, 6\)"):
        sel(torch.tensor([6]))
    assert torch.equal(select(OUT[:1], check_target(torch.tensor([2]), 1)), OUT[:1, 2])  # a batch of one: per sample
    ca = pytest.importorskip("captum.attr")
    torch.manual_seed(2)
    m = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Softplus(), torch.nn.Linear(8, 4)).double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 5, dtype=torch.float64)
    theirs = ca.IntegratedGradients(m).attribute(x, target=torch.tensor([2]), n_steps=8, method="gausslegendre")
    torch.testing.assert_close(ax.integrated_gradients(f, p, x, torch.tensor([2]), n_steps=8), theirs, rtol=1e-5, atol=1e-8)


def test_per_sample_tuple_targets_match_captum_and_the_loop():
    ca = pytest.importorskip("captum.attr")
    net, f, p = grid_model()
    x = torch.randn(3, 3, dtype=torch.float64)
    t = [(0, 1), (1, 2), (-1, 0)]
    out = f(p, x)
    assert torch.equal(select(out, check_target(t, 3)), out[torch.arange(3), [0, 1, 1], [1, 2, 0]])
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(ax.saliency(f, p, x, t, abs=False), ca.Saliency(net).attribute(xg, target=t, abs=False))
    theirs = ca.IntegratedGradients(net).attribute(x, target=t, n_steps=6, method="gausslegendre")
    torch.testing.assert_close(ax.integrated_gradients(f, p, x, t, n_steps=6, chunk_size=4), theirs, rtol=1e-5, atol=1e-8)
    # every method that folds copies or takes subsets repeats the tuples with the rows
    loop = lambda method, **kw: torch.cat([method(f, p, x[i:i + 1], t[i], **kw) for i in range(3)])  # noqa: E731
    torch.testing.assert_close(ax.integrated_gradients(f, p, x, t, n_steps="auto"), loop(ax.integrated_gradients, n_steps="auto"))
    noise = torch.randn(4, 3, 3, dtype=torch.float64) * 0.1
    torch.testing.assert_close(ax.noise_tunnel(ax.integrated_gradients, f, p, x, t, noise=noise, chunk_size=3, n_steps=4),
                               torch.cat([ax.noise_tunnel(ax.integrated_gradients, f, p, x[i:i + 1], t[i],
                                                          noise=noise[:, i:i + 1], n_steps=4) for i in range(3)]))
    torch.testing.assert_close(ax.deeplift(f, p, x, t), loop(ax.deeplift))
    torch.testing.assert_close(ax.occlusion(f, p, x, t, window=1), loop(ax.occlusion, window=1))


@pytest.mark.parametrize(
    "target, exc, match",
    [
        ([(0, 1), (1, 2)], ValueError, r"target has 2 index tuples but the batch has 3 samples"),
        ([(0, 1), (1,), (0, 0)], TypeError, "a per-sample target must be a list of index tuples of ints, all of one length"),
        ([(0, 1.5), (1, 2), (0, 0)], TypeError, "a per-sample target must be a list of index tuples"),
        ([(0, 1, 0), (1, 2, 0), (0, 0, 0)], ValueError, r"target index tuples have 3 indices but the output of shape \(3, 2, 3\)"),
        ([(0, 1), (2, 2), (0, 0)], ValueError, r"target index tuple \(2, 2\) of sample 1 is out of range at position 0 for output of shape \(3, 2, 3\)"),
    ],
)
def test_bad_per_sample_tuple_targets_fail_before_the_work(target, exc, match):
    _, f, p = grid_model()
    with pytest.raises(exc, match=match):
        ax.integrated_gradients(f, p, torch.randn(3, 3, dtype=torch.float64), target)


def test_sum_target_only_when_asked():
    assert torch.equal(sel("sum"), OUT.sum(1))
    _, f, p = grid_model()
    x = torch.randn(3, 3, dtype=torch.float64)
    total = lambda o: o.flatten(1).sum(1)  # noqa: E731
    for method in (ax.gradient, ax.deeplift, ax.integrated_gradients):
        torch.testing.assert_close(method(f, p, x, "sum"), method(f, p, x, total))
    with pytest.raises(ValueError, match=r'target is None but the output has shape \(3, 2, 3\).*or "sum" for the sum'):
        ax.gradient(f, p, x, None)  # never summed silently
    with pytest.raises(TypeError, match=r'target must be .* "sum" or None, got str \'mean\''):
        ax.gradient(f, p, x, "mean")


def test_ragged_target_lists_are_named():
    # found in review: ints mixed with tuples raised numpy's inhomogeneous-shape error
    f, p = ax.functionalize(torch.nn.Linear(4, 3).eval())
    with pytest.raises(TypeError, match=r"target sequence must be a flat sequence of ints.*output shape \(3, 3\)"):
        ax.gradient(f, p, torch.randn(3, 4), [(1,), (2,), 1])


def test_out_of_range_targets_raise_under_vmap_over_targets() -> None:
    """The seed's range check reads the targets' values; vmapped targets have none at hand, and there the
    selection's own index check must still fail (a wrapped index would pick another class silently)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).double().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(2, 5, dtype=torch.float64)
    for method in (ax.lrp, ax.deeplift):
        with pytest.raises((RuntimeError, ValueError), match="out of (bounds|range)"):
            torch.vmap(lambda t: method(f, p, x, t))(torch.tensor([[0, 1], [7, 1]]))
        with pytest.raises(ValueError, match=r"must lie in \[-3, 3\)"):
            method(f, p, x, torch.tensor([7, 1]))


def test_compiled_explainers_refuse_out_of_range_tensor_targets() -> None:
    """Compiled, the seed's range check has no values and the selection that checked it is dead code: an
    out-of-range index wrapped around to another class silently (a reviewer's find). Asserted in the graph."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    f, p = ax.functionalize(model)
    x = torch.randn(3, 5)
    explain = ax.compile(ax.lrp, f, p, backend="eager")
    torch.testing.assert_close(explain(x, torch.tensor([0, 3, -1])), ax.lrp(f, p, x, torch.tensor([0, 3, -1])))
    for bad in ([0, 4, 1], [0, -5, 1]):
        with pytest.raises(ValueError, match=r"must lie in \[-4, 4\)"):
            explain(x, torch.tensor(bad))
    compiled = torch.compile(lambda x, t: ax.deeplift(f, p, x, t), fullgraph=True, backend="eager")
    compiled(x, torch.tensor([0, 3, -1]))
    with pytest.raises(RuntimeError, match="out of (range|bounds)"):  # inductor drops the gather: the assert
        compiled(x, torch.tensor([0, 4, 1]))
