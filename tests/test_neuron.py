"""Neuron attribution: Captum parity, axioms at the neuron, selectors, errors."""

import pytest
import torch
from torch import nn

import attrax as ax
from attrax.rewrite import UnsupportedOperation
from conftest import assert_unchanged, module_snapshot

D = torch.float64


def rg(x):
    return x.detach().clone().requires_grad_()


def net():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3),
    ).double().eval()


X = torch.randn(3, 2, 6, 6, dtype=D, generator=torch.Generator().manual_seed(2))
B = torch.randn(3, 2, 6, 6, dtype=D, generator=torch.Generator().manual_seed(3)) * 0.1
# (layer path, neuron): a conv output (pre-ReLU), a ReLU output, and a Linear output selected by an int
CASES = [("2", (0, 1, 3)), ("3", (1, 2, 2)), ("5", 2)]


@pytest.fixture(scope="module")
def model():
    m = net()
    return m, *ax.functionalize(m)


@pytest.mark.parametrize("layer, neuron", CASES)
def test_neuron_methods_match_captum(model, layer, neuron):
    ca = pytest.importorskip("captum.attr")
    m, f, p = model
    mod = m[int(layer)]
    before = module_snapshot(m)
    pairs = [
        (ax.neuron.gradient(f, p, X, neuron, layer), ca.NeuronGradient(m, mod).attribute(rg(X), neuron)),
        (ax.neuron.integrated_gradients(f, p, X, neuron, layer, baseline=B, n_steps=16),
         ca.NeuronIntegratedGradients(m, mod).attribute(rg(X), neuron, baselines=B, n_steps=16, method="gausslegendre")),
        (ax.neuron.conductance(f, p, X, neuron, layer, target=1, baseline=B, n_steps=16),
         ca.NeuronConductance(m, mod).attribute(rg(X), neuron, baselines=B, target=1, n_steps=16, method="gausslegendre")),
        (ax.neuron.deeplift(f, p, X, neuron, layer, baseline=B), ca.NeuronDeepLift(m, mod).attribute(rg(X), neuron, baselines=B)),
        (ax.neuron.guided_backprop(f, p, X, neuron, layer), ca.NeuronGuidedBackprop(m, mod).attribute(rg(X), neuron)),
    ]
    for ours, theirs in pairs:
        assert ours.shape == X.shape and theirs.abs().max() > 1e-6  # a live neuron
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-9)
    assert_unchanged(m, before)


def test_neuron_input_slices_callables_and_local_variants_match_captum(model):
    ca = pytest.importorskip("captum.attr")
    m, f, p = model
    for to_input in (False, True):
        torch.testing.assert_close(
            ax.neuron.gradient(f, p, X, (1, 2, 2), "3", attribute_to_neuron_input=to_input),
            ca.NeuronGradient(m, m[3]).attribute(rg(X), (1, 2, 2), attribute_to_neuron_input=to_input))
        torch.testing.assert_close(
            ax.neuron.deeplift(f, p, X, (0, 1, 1), "2", baseline=B, attribute_to_neuron_input=to_input),
            ca.NeuronDeepLift(m, m[2]).attribute(rg(X), (0, 1, 1), baselines=B, attribute_to_neuron_input=to_input).detach())
    block, pick = (slice(0, 2), 1, 1), (lambda y: y[:, 1, 2, 2] * 2)
    torch.testing.assert_close(ax.neuron.gradient(f, p, X, block, "3"), ca.NeuronGradient(m, m[3]).attribute(rg(X), block))
    torch.testing.assert_close(ax.neuron.gradient(f, p, X, pick, "3"), ca.NeuronGradient(m, m[3]).attribute(rg(X), pick))
    torch.testing.assert_close(
        ax.neuron.integrated_gradients(f, p, X, (1, 2, 2), "3", baseline=B, n_steps=8, multiply_by_inputs=False),
        ca.NeuronIntegratedGradients(m, m[3], multiply_by_inputs=False).attribute(
            rg(X), (1, 2, 2), baselines=B, n_steps=8, method="gausslegendre"), rtol=1e-6, atol=1e-9)


def test_neuron_ig_and_deeplift_sum_to_the_neurons_change(model):
    m, f, p = model
    with torch.no_grad():
        y = lambda z: m[:4](z)[:, 1, 2, 2]  # noqa: E731
        span = y(X) - y(B)
    dl = ax.neuron.deeplift(f, p, X, (1, 2, 2), "3", baseline=B)
    torch.testing.assert_close(dl.flatten(1).sum(1), span, rtol=1e-10, atol=1e-12)  # exact
    ig = ax.neuron.integrated_gradients(f, p, X, (1, 2, 2), "3", baseline=lambda x: B, n_steps=64)
    # quadrature error at the ReLU kinks only
    torch.testing.assert_close(ig.flatten(1).sum(1), span, rtol=0, atol=0.05 * span.abs().max().item())


def test_conductance_of_every_neuron_together_is_ig(model):
    # a layer every path passes through: the conductances of all its neurons add up to IG of the target;
    # a callable neuron summing the layer selects all of them at once (d g / d y = 1)
    m, f, p = model
    everything = ax.neuron.conductance(f, p, X, lambda y: y.flatten(1).sum(1), "5", target=2, baseline=B, n_steps=12)
    ig = ax.integrated_gradients(f, p, X, 2, baseline=B, n_steps=12)
    torch.testing.assert_close(everything, ig, rtol=1e-8, atol=1e-10)
    one_by_one = sum(ax.neuron.conductance(f, p, X, j, "5", target=2, baseline=B, n_steps=12) for j in range(8))
    torch.testing.assert_close(one_by_one, ig, rtol=1e-8, atol=1e-10)


def test_chunks_tuples_and_noise_tunnel(model):
    m, f, p = model
    ref = ax.neuron.integrated_gradients(f, p, X, (1, 2, 2), "3", n_steps=7)
    torch.testing.assert_close(ax.neuron.integrated_gradients(f, p, X, (1, 2, 2), "3", n_steps=7, chunk_size=3), ref)
    ref = ax.neuron.conductance(f, p, X, (1, 2, 2), "3", target=0, n_steps=5)
    torch.testing.assert_close(ax.neuron.conductance(f, p, X, (1, 2, 2), "3", target=0, n_steps=5, chunk_size=2), ref)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 2)

        def forward(self, u, v):
            return self.head(torch.tanh(self.a(u) + self.b(v)))

    torch.manual_seed(0)
    two = Two().double().eval()
    f2, p2 = ax.functionalize(two)
    u, v = torch.randn(2, 3, dtype=D), torch.randn(2, 2, dtype=D)
    gu, gv = ax.neuron.gradient(f2, p2, (u, v), (1,), "head", attribute_to_neuron_input=True)
    h = torch.tanh(two.a(u) + two.b(v)).detach()
    torch.testing.assert_close(gu, ((1 - h[:, 1:2] ** 2) * two.a.weight[1]).detach())
    torch.testing.assert_close(gv, ((1 - h[:, 1:2] ** 2) * two.b.weight[1]).detach())
    # noise_tunnel passes the neuron through to the wrapped neuron method
    noise = torch.randn(4, *X.shape, dtype=D, generator=torch.Generator().manual_seed(5)) * 0.1
    nt = ax.noise_tunnel(ax.neuron.gradient, f, p, X, (1, 2, 2), noise=noise, layer="3")
    loop = sum(ax.neuron.gradient(f, p, X + e, (1, 2, 2), "3") for e in noise) / 4
    torch.testing.assert_close(nt, loop)


def test_only_the_layers_ancestors_need_rules():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 5), nn.ReLU()

        def forward(self, x):
            return torch.sort(self.act(self.fc(x)), dim=1).values  # sort has no DeepLift rule

    torch.manual_seed(0)
    f, p = ax.functionalize(Head().double().eval())
    x = torch.randn(2, 4, dtype=D)
    with pytest.raises(UnsupportedOperation, match="no rule"):
        ax.deeplift(f, p, x, 0)
    a = ax.neuron.deeplift(f, p, x, (1,), "act", baseline=0.0)
    with torch.no_grad():
        y = torch.relu(x @ p["fc.weight"].T + p["fc.bias"])[:, 1] - torch.relu(p["fc.bias"])[1]
    torch.testing.assert_close(a.sum(1), y)  # summation to delta at the neuron
    assert ax.neuron.guided_backprop(f, p, x, (1,), "act").shape == x.shape


@pytest.mark.parametrize(
    "neuron, exc, match",
    [
        ((4, 0, 0), ValueError, r"neuron \(4, 0, 0\) is out of range at position 0: layer '3' has output shape \(3, 4, 4, 4\)"),
        (2, ValueError, r"neuron is an int, which selects out\[:, 2\], but layer '3' has output shape \(3, 4, 4, 4\)"),
        ((1, 1, 1, 1), ValueError, r"neuron \(1, 1, 1, 1\) has 4 indices but layer '3'"),
        ("a", TypeError, "neuron must be a tuple of ints"),
        ((1.0, 2), TypeError, "neuron must be a tuple of ints"),
        (lambda y: y[:, 0], ValueError, r"a callable neuron must return one value per sample, shape \(3,\)"),
    ],
)
def test_bad_neurons_name_the_neuron_and_the_layer_shape(model, neuron, exc, match):
    _, f, p = model
    for method in (ax.neuron.gradient, ax.neuron.deeplift):
        with pytest.raises(exc, match=match):
            method(f, p, X, neuron, "3")


def test_bad_layer_and_integer_layer_values(model):
    _, f, p = model
    with pytest.raises(TypeError, match="layer must be"):
        ax.neuron.gradient(f, p, X, (0,), 3)
    with pytest.raises(ValueError, match="neither a module path nor a node"):
        ax.neuron.gradient(f, p, X, (0,), "nope")
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).double().eval()
    fe, pe = ax.functionalize(emb)
    ids = torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(TypeError, match="x must be a floating point tensor"):
        ax.neuron.gradient(fe, pe, ids, (0,), "2")
