"""Metrics: completeness, infidelity, max-sensitivity, deletion/insertion curves."""

import pytest
import torch
from torch import nn

import attrax as ax

D = torch.float64


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    return m, *ax.functionalize(m)


X = torch.randn(4, 5, dtype=D, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0, 1, 2, 1])


def test_completeness_delta_is_signed_and_uses_the_baseline():
    m, f, p = model()
    a = torch.zeros_like(X)
    b = torch.full_like(X, 0.5)
    with torch.no_grad():
        want = -(m(X).gather(1, T[:, None])[:, 0] - m(b).gather(1, T[:, None])[:, 0])
    torch.testing.assert_close(ax.metrics.completeness_delta(f, p, X, T, a, baseline=b), want)


def test_infidelity_matches_captum_on_a_shared_draw():
    cm = pytest.importorskip("captum.metrics")
    m, f, p = model()
    a = ax.integrated_gradients(f, p, X, T)
    noise = torch.randn(10, *X.shape, dtype=D, generator=torch.Generator().manual_seed(2)) * 0.1

    def perturb(inputs):  # Captum repeats each sample n times, sample-major
        pert = noise.transpose(0, 1).reshape(-1, X.shape[1])
        return pert, inputs - pert

    for normalize in (False, True):
        ours = ax.metrics.infidelity(f, p, X, T, a, perturbations=noise, normalize=normalize)
        theirs = cm.infidelity(m, perturb, X, a, target=T, n_perturb_samples=10, normalize=normalize)
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(ax.metrics.infidelity(f, p, X, T, a, perturbations=noise, chunk_size=3),
                               ax.metrics.infidelity(f, p, X, T, a, perturbations=noise))


def test_infidelity_is_zero_for_gradients_of_a_linear_model():
    # f(x) - f(x - I) = w . I exactly, so the gradient w has zero infidelity
    lin = nn.Linear(5, 2).double().eval()
    f, p = ax.functionalize(lin)
    a = ax.gradient(f, p, X, 1)
    assert ax.metrics.infidelity(f, p, X, 1, a, generator=torch.Generator().manual_seed(0)).abs().max() < 1e-20


def test_sensitivity_max_matches_captum_on_a_shared_draw():
    cm = pytest.importorskip("captum.metrics")
    ca = pytest.importorskip("captum.attr")
    m, f, p = model()
    deltas = (torch.rand(6, *X.shape, dtype=D, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 0.02

    def perturb(inputs, perturb_radius=0.02):
        return inputs + deltas.transpose(0, 1).reshape(-1, X.shape[1])

    ours = ax.metrics.sensitivity_max(ax.saliency, f, p, X, T, perturbations=deltas)
    theirs = cm.sensitivity_max(ca.Saliency(m).attribute, X.clone().requires_grad_(), perturb_func=perturb, n_perturb_samples=6, target=T)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-12)
    # method options reach the method; chunking does not change the result
    ig = ax.metrics.sensitivity_max(ax.integrated_gradients, f, p, X, T, perturbations=deltas, n_steps=8)
    torch.testing.assert_close(ax.metrics.sensitivity_max(ax.integrated_gradients, f, p, X, T, perturbations=deltas,
                                                          n_steps=8, chunk_size=4), ig)


def test_deletion_and_insertion_curves():
    lin = nn.Linear(5, 1, bias=False).double().eval()
    f, p = ax.functionalize(lin)
    a = ax.input_x_gradient(f, p, X, None)
    dele = ax.metrics.deletion_curve(f, p, X, None, a, steps=5)
    ins = ax.metrics.insertion_curve(f, p, X, None, a, steps=5)
    torch.testing.assert_close(dele.fractions, torch.linspace(0, 1, 6, dtype=D))
    with torch.no_grad():
        full = lin(X)[:, 0]
    torch.testing.assert_close(dele.scores[:, 0], full)
    torch.testing.assert_close(dele.scores[:, -1], torch.zeros_like(full))
    torch.testing.assert_close(ins.scores[:, -1], full)
    # one feature per step, most relevant first: deletion removes the largest contributions first
    contrib = a.sort(1, descending=True).values
    torch.testing.assert_close(dele.scores[:, 1], full - contrib[:, 0])
    torch.testing.assert_close(ins.scores[:, 2], contrib[:, :2].sum(1))
    assert (dele.auc <= ins.auc + 1e-12).all()
    torch.testing.assert_close(dele.auc, torch.trapezoid(dele.scores, dele.fractions, dim=1))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda f, p: ax.metrics.infidelity(f, p, X, T, torch.zeros(4, 3)), ValueError, "attributions must match x"),
        (lambda f, p: ax.metrics.infidelity(f, p, X, T, X, n_samples=0), ValueError, "n_samples must be >= 1"),
        (lambda f, p: ax.metrics.sensitivity_max(ax.saliency, f, p, X, T, radius=-1.0), ValueError, "radius must be >= 0"),
        (lambda f, p: ax.metrics.deletion_curve(f, p, X, T, X, steps=0), ValueError, "steps must be >= 1"),
    ],
)
def test_bad_arguments(call, exc, match):
    _, f, p = model()
    with pytest.raises(exc, match=match):
        call(f, p)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, u, v):
        return self.out(torch.tanh(self.a(u) + self.b(v)))


def test_sensitivity_max_repeats_per_sample_tuple_arguments():
    # issue 15 item 17: a tuple of per-sample baselines was stacked with the perturbed copies
    # ("baseline[0] of shape (4, 3) does not broadcast to x of shape (24, 3)")
    torch.manual_seed(0)
    f, p = ax.functionalize(_TwoInputs().double().eval())
    g = torch.Generator().manual_seed(4)
    u, v = torch.randn(4, 3, dtype=D, generator=g), torch.randn(4, 2, dtype=D, generator=g)
    bl = (torch.randn(4, 3, dtype=D, generator=g), torch.randn(4, 2, dtype=D, generator=g))
    deltas = tuple((torch.rand(6, *t.shape, dtype=D, generator=g) * 2 - 1) * 0.05 for t in (u, v))
    got = ax.metrics.sensitivity_max(ax.integrated_gradients, f, p, (u, v), T, perturbations=deltas, baseline=bl, n_steps=6)

    def flat(a):
        return torch.cat([t.reshape(4, -1) for t in a], 1)

    base = flat(ax.integrated_gradients(f, p, (u, v), T, baseline=bl, n_steps=6))
    sens = [
        (flat(ax.integrated_gradients(f, p, (u + du, v + dv), T, baseline=bl, n_steps=6)) - base).norm(dim=1) / base.norm(dim=1)
        for du, dv in zip(*deltas)
    ]
    torch.testing.assert_close(got, torch.stack(sens).amax(0))
