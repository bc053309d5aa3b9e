"""LRP: rule definitions, conservation, Zennit equivalence, spellings, composability."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attrax as ax
from attrax.composites import Kind
from attrax.testing import cnns, relu_cnns, relu_mlps, resnets
from conftest import assert_grad_matches_finite_differences, assert_unchanged, module_snapshot
from _peers import resnet_blocks, zennit, zennit_relevance

D = torch.float64
R = ax.rules


# ------------------------------------------------------- each rule vs its matrix form

torch.manual_seed(0)
W = torch.randn(4, 6, dtype=D)
B = torch.randn(4, dtype=D) * 0.3
A = torch.randn(2, 6, dtype=D)
C = torch.randn(4, dtype=D)  # the callable target (out * C).sum(1) seeds the layer's outputs with z * C

RULES = [R.Epsilon(0.1), R.ZPlus(), R.AlphaBeta(3.0, 2.0), R.Gamma(0.5), R.Flat(), R.WSquare(), R.ZBox(-2.0, 1.5)]


def _stab(z, eps=1e-6):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def contrib(a, w, b=None):
    """(B, out, in) contributions a_i w_ji, and z_j = sum_i + b_j."""
    c = a[:, None, :] * w[None]
    z = c.sum(2) + (0 if b is None else b)
    return c, z


def matrix_form(rule, a, w, b, r, w_ones):
    """The rule's relevance for the inputs of z = w a + b, from the definitions in relevance.py.

    a: (B, in) inputs, w: (out, in) the layer's matrix, b: (out,) its bias, r: (B, out) the relevance
    arriving at the outputs, w_ones: the layer's matrix with every weight replaced by one (flat).
    """
    pos, neg = (lambda t: t.clamp(min=0)), (lambda t: t.clamp(max=0))
    if isinstance(rule, R.Epsilon):
        c, z = contrib(a, w, b)
        return (c * (r / _stab(z, rule.epsilon))[:, :, None]).sum(1)
    if isinstance(rule, R.ZPlus):
        cp, zp = contrib(pos(a), pos(w), pos(b))
        cn, zn = contrib(neg(a), neg(w))
        return ((cp + cn) * (r / _stab(zp + zn, rule.stabilizer))[:, :, None]).sum(1)
    if isinstance(rule, R.AlphaBeta):
        c1, z1 = contrib(pos(a), pos(w), pos(b))
        c2, z2 = contrib(neg(a), neg(w))
        c3, z3 = contrib(pos(a), neg(w), neg(b))
        c4, z4 = contrib(neg(a), pos(w))
        p_ = ((c1 + c2) * (r / _stab(z1 + z2, rule.stabilizer))[:, :, None]).sum(1)
        n_ = ((c3 + c4) * (r / _stab(z3 + z4, rule.stabilizer))[:, :, None]).sum(1)
        return rule.alpha * p_ - rule.beta * n_
    if isinstance(rule, R.Gamma):
        g = rule.gamma
        wp, wn = w + g * pos(w), w + g * neg(w)
        bp, bn = b + g * pos(b), b + g * neg(b)
        _, z = contrib(a, w, b)
        c1, z1 = contrib(pos(a), wp, bp)
        c2, z2 = contrib(neg(a), wn)
        c3, z3 = contrib(pos(a), wn, bn)
        c4, z4 = contrib(neg(a), wp)
        p_ = ((c1 + c2) * ((z > 0) * r / _stab(z1 + z2, rule.stabilizer))[:, :, None]).sum(1)
        n_ = ((c3 + c4) * ((z < 0) * r / _stab(z3 + z4, rule.stabilizer))[:, :, None]).sum(1)
        return p_ + n_
    if isinstance(rule, R.Flat):  # inputs and weights ones, no bias: every input of a unit gets R_j / fan-in
        return (w_ones[None] * (r / _stab(w_ones.sum(1), rule.stabilizer))[:, :, None]).sum(1)
    if isinstance(rule, R.WSquare):  # inputs ignored, weights and bias squared
        w2 = w * w
        return (w2[None] * (r / _stab(w2.sum(1) + b * b, rule.stabilizer))[:, :, None]).sum(1)
    if isinstance(rule, R.ZBox):
        c1, z1 = contrib(a, w, b)
        c2, z2 = contrib(torch.full_like(a, rule.low), pos(w), pos(b))
        c3, z3 = contrib(torch.full_like(a, rule.high), neg(w), neg(b))
        return ((c1 - c2 - c3) * (r / _stab(z1 - z2 - z3, rule.stabilizer))[:, :, None]).sum(1)
    raise AssertionError(rule)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: type(r).__name__)
def test_rules_match_their_matrix_form_on_a_linear_layer(rule):
    lin = nn.Linear(6, 4).double().eval()
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(B)
    f, p = ax.functionalize(lin)
    rel = ax.lrp(f, p, A, lambda out: (out * C).sum(1), composite={nn.Linear: rule})
    r = (A @ W.T + B) * C  # the relevance entering the layer: out * dg/dout
    torch.testing.assert_close(rel, matrix_form(rule, A, W, B, r, torch.ones_like(W)))


TRANSPOSED = {
    "1d": lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1, dilation=2),
    "2d": lambda: nn.ConvTranspose2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), groups=2),
}


def dense(layer, weight, x_shape):
    """The matrix (out, in) of ``layer`` with ``weight`` and no bias: the layer applied to the identity basis."""
    n = int(torch.tensor(x_shape).prod())
    basis = torch.eye(n, dtype=D).reshape(n, *x_shape)
    cols = torch.func.functional_call(layer, {"weight": weight, "bias": torch.zeros_like(layer.bias)}, (basis,))
    return cols.reshape(n, -1).T


@pytest.mark.parametrize("rule", RULES, ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("kind", list(TRANSPOSED))
def test_rules_match_their_matrix_form_on_a_transposed_convolution(kind, rule):
    # Issue 15.11: transposed convolutions got the default Norm rule whatever the composite asked for
    torch.manual_seed(1)
    layer = TRANSPOSED[kind]().double().eval()
    x_shape = (2, 5) if kind == "1d" else (2, 3, 4)
    x = torch.randn(3, *x_shape, dtype=D)
    f, p = ax.functionalize(layer)
    with torch.no_grad():
        out = layer(x)
    c = torch.randn(out.shape[1:], dtype=D)
    rel = ax.lrp(f, p, x, lambda o: (o * c).flatten(1).sum(1), composite={type(layer): rule})
    w = dense(layer, layer.weight.detach(), x_shape)
    b = layer.bias.detach().repeat_interleave(out[0, 0].numel())
    a = x.flatten(1)
    torch.testing.assert_close(w @ a.T + b[:, None], out.flatten(1).T)  # the matrix is the layer
    want = matrix_form(rule, a, w, b, (out * c).flatten(1), dense(layer, torch.ones_like(layer.weight), x_shape))
    torch.testing.assert_close(rel.flatten(1), want)


def test_norm_and_pass_on_sums_and_activations():
    def fn(p, x):  # y = tanh(x[:, :3]) + x[:, 3:]
        return (torch.tanh(x[:, :3]) + x[:, 3:]).sum(1, keepdim=True)

    x = torch.randn(2, 6, dtype=D)
    rel = ax.lrp(fn, {}, x, None)
    u, v = torch.tanh(x[:, :3]), x[:, 3:]
    s = u + v
    y = s.sum(1, keepdim=True)
    # unit seed at y; the final sum is Norm: R_s = s / stab(y); the add is Norm: R_u = u R_s / stab(s),
    # R_v = v R_s / stab(s); tanh passes; the result is scaled by the score y.
    r_s = s / _stab(y)
    want = torch.cat([u * r_s / _stab(s), v * r_s / _stab(s)], 1) * y
    torch.testing.assert_close(rel, want)


def test_rule_parameters_are_validated():
    with pytest.raises(ValueError, match="alpha - beta must equal 1"):
        R.AlphaBeta(2.0, 2.0)
    with pytest.raises(ValueError, match="non-negative"):
        R.AlphaBeta(-1.0, -2.0)
    with pytest.raises(ValueError, match="zero_params"):
        R.Epsilon(zero_params=("gain",))
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        R.Epsilon(-1.0)


# ------------------------------------------------------------ defining properties


@settings(max_examples=25)
@given(case=st.one_of(relu_mlps(bias=False), relu_cnns(bias=False)))
def test_epsilon_to_zero_equals_input_x_gradient(case):
    comp = ax.composites.mapping(by_type={Kind("layer"): R.Epsilon(1e-10), Kind("avgpool"): R.Norm(1e-12)})
    rel = ax.lrp(case.model_fn, case.params, case.x, case.target, composite=comp)
    ixg = ax.input_x_gradient(case.model_fn, case.params, case.x, case.target)
    torch.testing.assert_close(rel, ixg, rtol=1e-5, atol=1e-7)


LINEAR_TARGETS = {
    "difference": lambda o: o[:, 0] - 0.5 * o[:, -1],
    "scaled": lambda o: 2 * o[:, -1],
    "sum": lambda o: 3 * o[:, -1] + o[:, 0],
    "all": lambda o: (o * torch.linspace(-1, 2, o.shape[1], dtype=o.dtype)).sum(1),
}


@settings(max_examples=20)
@given(case=st.one_of(relu_mlps(bias=False), relu_cnns(bias=False)), name=st.sampled_from(sorted(LINEAR_TARGETS)))
def test_callable_linear_targets_are_conserved(case, name):
    # Issue 15.2: the relevance entering the network is out * dg/dout (API.md section 2), so it sums to
    # g(out) for every linear g; it was dg/dout * g(out): half the target for o0 - 0.5 o2, twice it for 2 o1.
    g = LINEAR_TARGETS[name]
    comp = ax.composites.mapping(by_type={Kind("layer"): R.Epsilon(1e-10), Kind("avgpool"): R.Norm(1e-10)})
    rel = ax.lrp(case.model_fn, case.params, case.x, g, composite=comp)
    with torch.no_grad():
        want = g(case.model_fn(case.params, case.x))
    torch.testing.assert_close(rel.flatten(1).sum(1), want, rtol=1e-6, atol=1e-9)
    # ... and it is the same linear combination of the index targets' relevances
    if name == "difference":
        parts = ax.lrp(case.model_fn, case.params, case.x, 0, composite=comp) - 0.5 * ax.lrp(
            case.model_fn, case.params, case.x, -1, composite=comp)
        torch.testing.assert_close(rel, parts, rtol=1e-6, atol=1e-9)
    # composite=None (Epsilon(1e-6)): conserved up to what the stabiliser absorbs
    rel = ax.lrp(case.model_fn, case.params, case.x, g)
    torch.testing.assert_close(rel.flatten(1).sum(1), want, rtol=1e-2, atol=1e-4)


@settings(max_examples=10)
@given(case=st.one_of(relu_mlps(bias=False), relu_cnns(bias=False)))
def test_callable_equal_to_an_index_target_gives_the_same_relevance(case):
    t = case.target
    for comp in (None, ax.composites.epsilon_plus(), ax.composites.epsilon_gamma_box()):
        by_int = ax.lrp(case.model_fn, case.params, case.x, 0, composite=comp)
        by_fn = ax.lrp(case.model_fn, case.params, case.x, lambda o: o[:, 0], composite=comp)
        torch.testing.assert_close(by_fn, by_int, rtol=1e-6, atol=1e-10)
        by_tensor = ax.lrp(case.model_fn, case.params, case.x, t, composite=comp)
        by_fn = ax.lrp(case.model_fn, case.params, case.x, lambda o: o.gather(1, t[:, None])[:, 0], composite=comp)
        torch.testing.assert_close(by_fn, by_tensor, rtol=1e-6, atol=1e-10)


SMALL = 1e-10
CONSERVATIVE = {
    "epsilon": lambda: ax.composites.mapping(by_type={
        Kind("layer"): R.Epsilon(SMALL), Kind("add"): R.Norm(SMALL), Kind("avgpool"): R.Norm(SMALL), Kind("arithmetic"): R.Norm(SMALL)}),
    "zplus": lambda: ax.composites.epsilon_plus(epsilon=SMALL, stabilizer=SMALL),
    "flat": lambda: ax.composites.epsilon_plus_flat(epsilon=SMALL, stabilizer=SMALL),
    "alpha2beta1": lambda: ax.composites.epsilon_alpha2_beta1(epsilon=SMALL, stabilizer=SMALL),
    "alpha2beta1_flat": lambda: ax.composites.epsilon_alpha2_beta1_flat(epsilon=SMALL, stabilizer=SMALL),
    "zplus_flat": lambda: ax.composites.epsilon_plus_flat(epsilon=SMALL, stabilizer=SMALL),
}


def _zero_bn_shift(case):
    """Zero BatchNorm means and shifts so the folded biases are zero too."""
    with torch.no_grad():
        for m in case.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
                m.bias.zero_()
    return case


def _conserves(case, composite):
    case = _zero_bn_shift(case)
    rel = ax.lrp(case.model_fn, case.params, case.x, case.target, composite=composite)
    with torch.no_grad():
        score = case.model_fn(case.params, case.x).gather(1, case.target[:, None])[:, 0]
    torch.testing.assert_close(rel.flatten(1).sum(1), score, rtol=1e-4, atol=1e-8)


# When each rule conserves (notes/lrp.md): epsilon, Norm and flat always; z+ and alpha-beta at every unit
# whose positive (and, for alpha-beta, negative) contributions are nonzero. ReLU sparsity and a signed input
# seen through a few taps at the image border can zero them, which is why LRP practice puts flat / z^B on
# the first layer. The same numbers come out of Zennit (test_zennit_equivalence).


@settings(max_examples=20)
@given(case=resnets(activations=("relu", "softplus", "sigmoid"), bias=False, batchnorm=True, softmax=False))
def test_conservation_epsilon_residual_nets(case):
    _conserves(case, CONSERVATIVE["epsilon"]())


@pytest.mark.parametrize("name", ["zplus_flat", "alpha2beta1_flat"])
@settings(max_examples=15)
@given(case=resnets(activations=("softplus", "sigmoid"), bias=False, batchnorm=True, softmax=False))
def test_conservation_residual_nets_positive_activations(name, case):
    _conserves(case, CONSERVATIVE[name]())


@pytest.mark.parametrize("name", ["epsilon", "zplus", "flat"])
@settings(max_examples=12)
@given(case=cnns(activations=("relu",), bias=False, batchnorm=True))
def test_conservation_relu_cnns(name, case):
    # without residual sums, a ReLU unit with z+ = 0 is dead and carries no relevance: z+ conserves
    _conserves(case, CONSERVATIVE[name]())


def test_zplus_loss_is_exactly_the_relevance_of_units_without_positive_contributions():
    # One conv layer, signed input: sum(R_in) = sum over units with z+ != 0 of R_j.
    torch.manual_seed(5)
    conv = nn.Conv2d(1, 3, 3, padding=1, bias=False).double().eval()
    f, p = ax.functionalize(conv)
    x = torch.randn(4, 1, 5, 5, dtype=D)
    c = torch.randn(3, 5, 5, dtype=D)
    rel = ax.lrp(f, p, x, lambda out: (out * c).flatten(1).sum(1), composite={nn.Conv2d: R.ZPlus(stabilizer=1e-12)})
    with torch.no_grad():
        r_out = conv(x) * c  # the relevance entering the layer: out * dg/dout
        zp = F.conv2d(x.clamp(min=0), conv.weight.clamp(min=0), padding=1) + F.conv2d(x.clamp(max=0), conv.weight.clamp(max=0), padding=1)
        kept = (r_out * (zp != 0)).flatten(1).sum(1)
    assert (kept - r_out.flatten(1).sum(1)).abs().min() > 1e-3  # some relevance is lost
    torch.testing.assert_close(rel.flatten(1).sum(1), kept, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------- zennit parity


def vgg_like(bn=True):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8) if bn else nn.Identity(), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
              nn.BatchNorm2d(8) if bn else nn.Identity(), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
              nn.BatchNorm2d(16) if bn else nn.Identity(), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
              nn.Linear(64, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 5)]
    return _random_bn(nn.Sequential(*[l for l in layers if not isinstance(l, nn.Identity)]).double().eval())


def resnet_like(inplace=True):
    BasicBlock, Bottleneck = resnet_blocks()
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=ds), Bottleneck(16, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    return _random_bn(m.double().eval())


def _random_bn(m):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g, dtype=D) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g, dtype=D) + 0.5)
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g, dtype=D) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=D) * 0.1)
    return m


COMPOSITES = {
    "epsilon_plus": (lambda: ax.composites.epsilon_plus(), "EpsilonPlus", {}),
    "epsilon_plus_flat": (lambda: ax.composites.epsilon_plus_flat(), "EpsilonPlusFlat", {}),
    "epsilon_gamma_box": (lambda: ax.composites.epsilon_gamma_box(low=-3.0, high=3.0, gamma=0.25), "EpsilonGammaBox",
                          {"low": -3.0, "high": 3.0}),
    "epsilon_alpha2_beta1": (lambda: ax.composites.epsilon_alpha2_beta1(), "EpsilonAlpha2Beta1", {}),
    "epsilon_alpha2_beta1_flat": (lambda: ax.composites.epsilon_alpha2_beta1_flat(), "EpsilonAlpha2Beta1Flat", {}),
    "guided_backprop": (lambda: ax.composites.guided_backprop(), "GuidedBackprop", {}),
    "excitation_backprop": (lambda: ax.composites.excitation_backprop(), "ExcitationBackprop", {}),
    "deconvnet": (lambda: ax.composites.deconvnet(), "DeconvNet", {}),
    "beta_smooth": (lambda: ax.composites.beta_smooth(5.0), "BetaSmooth", {"beta_smooth": 5.0}),
}


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
@pytest.mark.parametrize("name", COMPOSITES)
def test_zennit_equivalence(arch, name):
    if (arch, name) == ("resnet", "beta_smooth"):
        pytest.skip("Zennit's ReLUBetaSmooth keeps the last input of a reused nn.ReLU (torchvision's blocks call "
                    "self.relu twice) and fails with a shape error; the VGG case and _SmoothNet cover the rule")
    zennit()
    from zennit import composites as zc
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    model = vgg_like() if arch == "vgg" else resnet_like()
    canon = VGGCanonizer() if arch == "vgg" else ResNetCanonizer()
    ours_factory, zennit_name, kwargs = COMPOSITES[name]
    f, p = ax.functionalize(model)
    torch.manual_seed(2)
    x = torch.randn(3, 3, 16, 16, dtype=D)
    t = torch.tensor([0, 3, 1])
    before = module_snapshot(model)
    ours = ax.lrp(f, p, x, t, composite=ours_factory())
    assert_unchanged(model, before)
    with torch.no_grad():
        score = model(x).gather(1, t[:, None])[:, 0]
    theirs = torch.cat(
        [zennit_relevance(model, x[i : i + 1], int(t[i]), getattr(zc, zennit_name)(canonizers=[canon], **kwargs)) for i in range(3)]
    )
    torch.testing.assert_close(ours, theirs * score[:, None, None, None], rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("clip,norm_scale", [(True, False), (False, True), (True, True)])
def test_stabilizer_options_match_zennit(clip, norm_scale):
    # Zennit's Stabilizer(epsilon, clip, norm_scale) as keyword options of Epsilon and Norm; a large
    # epsilon so that the options change the result (checked against the plain stabiliser)
    zennit()
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.core import Stabilizer
    from zennit.rules import Epsilon as ZEpsilon
    from zennit.torchvision import VGGCanonizer
    from zennit.types import Convolution

    eps = 0.5
    model = vgg_like()
    f, p = ax.functionalize(model)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16, dtype=D)
    t = torch.tensor([0, 3])
    stab = Stabilizer(eps, clip=clip, norm_scale=norm_scale)
    theirs_comp = LayerMapComposite(layer_map_base(stab) + [(Convolution, ZEpsilon(stab)), (nn.Linear, ZEpsilon(stab))],
                                    canonizers=[VGGCanonizer()])
    opts = {"clip": clip, "norm_scale": norm_scale}
    ours_comp = ax.composites.mapping(by_type={Kind("activation"): R.Pass(), Kind("avgpool"): R.Norm(eps, **opts),
                                               Kind("add"): R.Norm(eps, **opts), Kind("layer"): R.Epsilon(eps, **opts)})
    ours = ax.lrp(f, p, x, t, composite=ours_comp)
    with torch.no_grad():
        score = model(x).gather(1, t[:, None])[:, 0]
    theirs = torch.cat([zennit_relevance(model, x[i : i + 1], int(t[i]), theirs_comp) for i in range(2)])
    torch.testing.assert_close(ours, theirs * score[:, None, None, None], rtol=1e-4, atol=1e-10)
    plain = ax.lrp(f, p, x, t, composite=ax.composites.mapping(by_type={Kind("avgpool"): R.Norm(eps), Kind("layer"): R.Epsilon(eps)}))
    assert (ours - plain).abs().max() > 1e-3 * plain.abs().max()


class _SmoothNet(nn.Module):
    """ReLU beside activations guided backprop and deconvnet leave alone (Zennit maps only nn.ReLU)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.acts = nn.ModuleList([nn.ReLU(), nn.SiLU(), nn.LeakyReLU(0.1), nn.Tanh()])
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.acts[1](self.c1(x))
        h = self.acts[0](self.c2(h)) + self.acts[2](h)
        return self.fc(self.acts[3](h).mean((2, 3)))


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet", "beta_smooth"])
def test_relu_only_composites_leave_other_activations_to_the_gradient(name):
    # Zennit's GuidedBackprop/DeconvNet/BetaSmooth map torch.nn.ReLU only: SiLU, LeakyReLU and tanh keep
    # their gradient there (and so in attrax: Kind("relu") does not match them); the sum is a gradient too
    zennit()
    from zennit import composites as zc

    torch.manual_seed(0)
    m = _SmoothNet().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    t = torch.tensor([1, 2])
    ours_factory, zennit_name, kwargs = COMPOSITES[name]
    ours = ax.lrp(f, p, x, t, composite=ours_factory())
    with torch.no_grad():
        score = m(x).gather(1, t[:, None])[:, 0]
    theirs = torch.cat([zennit_relevance(m, x[i : i + 1], int(t[i]), getattr(zc, zennit_name)(**kwargs)) for i in range(2)])
    torch.testing.assert_close(ours, theirs * score[:, None, None, None], rtol=1e-4, atol=1e-10)


class _StackSumBlock(nn.Module):
    """A residual sum written as Zennit's ``Sum`` module: ``torch.stack([a, b], dim).sum(dim)``."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.relu, self.relu2, self.pool = nn.ReLU(), nn.ReLU(), nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 16, 4)

    def forward(self, x):
        h = self.relu(self.c1(x))
        h = self.relu2(torch.stack([h, self.c2(h)], self.dim).sum(self.dim))
        return self.fc(self.pool(h).flatten(1))


@pytest.mark.parametrize("dim", [-1, 0])
def test_excitation_backprop_norm_at_a_stacked_sum(dim):
    zennit()
    from zennit.composites import ExcitationBackprop
    from zennit.layer import Sum

    torch.manual_seed(0)
    m = _StackSumBlock(dim).double().eval()
    zm = copy.deepcopy(m)
    zm.sum = Sum()  # Zennit maps the Sum module type to Norm; its forward is the stack-sum above

    def zforward(x):
        h = zm.relu(zm.c1(x))
        h = zm.relu2(zm.sum(torch.stack([h, zm.c2(h)], -1)))
        return zm.fc(zm.pool(h).flatten(1))

    zm.forward = zforward
    f, p = ax.functionalize(m)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    t = torch.tensor([1, 2])
    ours = ax.lrp(f, p, x, t, composite=ax.composites.excitation_backprop())
    with torch.no_grad():
        score = m(x).gather(1, t[:, None])[:, 0]
        torch.testing.assert_close(zm(x), m(x))
    theirs = torch.cat([zennit_relevance(zm, x[i : i + 1], int(t[i]), ExcitationBackprop()) for i in range(2)])
    torch.testing.assert_close(ours, theirs * score[:, None, None, None], rtol=1e-4, atol=1e-10)


class CustomResidual(nn.Module):
    """A residual block Zennit's canonizers do not know, and a conv module called twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        h = self.relu(self.c1(x))
        h = h + self.relu(self.c2(h))
        h = self.relu(self.c2(h))  # c2 again
        return self.fc(h.mean((2, 3)))


def test_where_zennit_is_wrong_attrax_conserves():
    # Zennit routes the un-canonized `h + f(h)` through the gradient (relevance duplicated) and its
    # hooks keep only the last input of the reused c2, so its relevance does not sum to the score;
    # attrax uses Norm at the sum and sees both c2 call sites (notes/lrp.md).
    zennit()
    from zennit.composites import EpsilonPlus

    torch.manual_seed(0)
    m = CustomResidual().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    t = torch.tensor([1, 2])
    with torch.no_grad():
        score = m(x).gather(1, t[:, None])[:, 0]
    ours = ax.lrp(f, p, x, t, composite=ax.composites.epsilon_plus(epsilon=1e-9))
    torch.testing.assert_close(ours.flatten(1).sum(1), score, rtol=1e-4, atol=1e-10)
    theirs = torch.cat([zennit_relevance(m, x[i : i + 1], int(t[i]), EpsilonPlus()) for i in range(2)]) * score[:, None, None, None]
    assert ((theirs.flatten(1).sum(1) - score).abs() > 0.1 * score.abs()).all()


# ---------------------------------------------------------------- spellings, module


def test_functional_reused_and_inplace_get_the_plain_module_relevance():
    from test_deeplift import SPELLINGS, Spelled

    torch.manual_seed(0)
    ref = Spelled("module").double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=D)
    t = torch.tensor([1, 2])
    fr, pr = ax.functionalize(ref)
    for comp in (None, ax.composites.epsilon_plus_flat(), ax.composites.epsilon_gamma_box()):
        want = ax.lrp(fr, pr, x, t, composite=comp)
        for how in SPELLINGS:
            other = Spelled(how).double().eval()
            other.load_state_dict(ref.state_dict())
            before = module_snapshot(other)
            fo, po = ax.functionalize(other)
            torch.testing.assert_close(ax.lrp(fo, po, x, t, composite=comp), want, rtol=1e-12, atol=1e-14)
            assert_unchanged(other, before)


def test_canonize_false_keeps_batchnorm_as_pass():
    m = vgg_like()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 3, 16, 16, dtype=D)
    merged = ax.lrp(f, p, x, 1)
    unmerged = ax.lrp(f, p, x, 1, canonize=False)
    assert not torch.allclose(merged, unmerged)
    comp = ax.composites.mapping(by_type={nn.BatchNorm2d: R.Pass()})
    torch.testing.assert_close(ax.lrp(f, p, x, 1, canonize=False, composite=comp), unmerged)


# ----------------------------------------------------------------------- composites


def test_dict_and_callable_composites():
    m = vgg_like(bn=False)
    f, p = ax.functionalize(m)
    x = torch.randn(2, 3, 16, 16, dtype=D)
    by_dict = ax.lrp(f, p, x, 1, composite={nn.Conv2d: R.ZPlus(), "0": R.Flat(), nn.Linear: R.Epsilon(0.01)})
    by_call = ax.lrp(
        f, p, x, 1,
        composite=lambda name, layer: R.Flat() if name == "0" else R.ZPlus() if isinstance(layer, nn.Conv2d) else
        R.Epsilon(0.01) if isinstance(layer, nn.Linear) else None,
    )
    by_mapping = ax.lrp(f, p, x, 1, composite=ax.composites.mapping(
        by_type={nn.Conv2d: R.ZPlus(), nn.Linear: R.Epsilon(0.01)}, first={Kind("layer"): R.Flat()}))
    torch.testing.assert_close(by_dict, by_call)
    torch.testing.assert_close(by_dict, by_mapping)
    # name globs win over types
    # the linear layers are modules "10" and "13"
    globbed = ax.lrp(f, p, x, 1, composite={"1[03]": R.Epsilon(0.5), nn.Conv2d: R.ZPlus()})
    manual = ax.lrp(f, p, x, 1, composite={"10": R.Epsilon(0.5), "13": R.Epsilon(0.5), nn.Conv2d: R.ZPlus()})
    by_type = ax.lrp(f, p, x, 1, composite={nn.Linear: R.Epsilon(0.5), nn.Conv2d: R.ZPlus()})
    torch.testing.assert_close(globbed, manual)
    torch.testing.assert_close(globbed, by_type)
    with pytest.raises(ValueError, match="rule Epsilon does not apply to aten.relu"):
        ax.lrp(f, p, x, 1, composite={"1*": R.Epsilon(0.5)})  # "1" is a ReLU module


def test_functional_model_composites_match_by_kind_and_type():
    def fn(p, x):
        h = F.relu(F.conv2d(x, p["w1"], padding=1))
        h = F.avg_pool2d(h, 2)
        return F.linear(h.flatten(1), p["w2"])

    torch.manual_seed(3)
    p = {"w1": torch.randn(4, 2, 3, 3, dtype=D), "w2": torch.randn(3, 16, dtype=D)}
    x = torch.randn(2, 2, 4, 4, dtype=D)
    a = ax.lrp(fn, p, x, 0, composite=ax.composites.epsilon_plus())
    b = ax.lrp(fn, p, x, 0, composite={nn.Conv2d: R.ZPlus(), nn.Linear: R.Epsilon()})
    torch.testing.assert_close(a, b)


def decoder():
    torch.manual_seed(6)
    return nn.Sequential(
        nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(2 * 8 * 8, 3),
    ).double().eval()


@pytest.mark.parametrize("name", ["epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat",
                                  "user_dict"])
def test_composites_reach_transposed_convolutions(name):
    # Issue 15.11: ConvTranspose got the default Norm rule (a user dict naming its type raised instead)
    m = decoder()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 3, 4, 4, dtype=D)
    first, convs = {
        "epsilon_plus": (R.ZPlus(), R.ZPlus()),
        "epsilon_plus_flat": (R.Flat(), R.ZPlus()),
        "epsilon_gamma_box": (R.ZBox(-3.0, 3.0), R.Gamma(0.25)),
        "epsilon_alpha2_beta1_flat": (R.Flat(), R.AlphaBeta(2.0, 1.0)),
        "user_dict": (R.Gamma(0.25), R.Gamma(0.25)),
    }[name]
    comp = ({nn.ConvTranspose2d: R.Gamma(0.25)} if name == "user_dict" else getattr(ax.composites, name)())
    by_name = {"0": first, "2": convs, "4": R.Epsilon() if name == "user_dict" else convs, "7": R.Epsilon()}
    rel = ax.lrp(f, p, x, 1, composite=comp)
    torch.testing.assert_close(rel, ax.lrp(f, p, x, 1, composite=by_name))
    as_norm = ax.lrp(f, p, x, 1, composite={**by_name, "0": R.Norm(), "2": R.Norm()})
    assert (rel - as_norm).abs().max() > 1e-3 * rel.abs().max()
    if name != "user_dict":  # called with a module, the composite sees a convolution too
        assert comp("2", m[2]) == convs


def test_functional_transposed_convolutions_match_the_module():
    m = decoder()
    f, p = ax.functionalize(m)

    def fn(p, x):  # the same model through F.conv_transpose2d and aten.convolution(transposed=True)
        h = F.relu(F.conv_transpose2d(x, p["0.weight"], p["0.bias"], stride=2, padding=1, output_padding=1))
        h = F.relu(torch.convolution(h, p["2.weight"], p["2.bias"], [1, 1], [1, 1], [1, 1], True, [0, 0], 1))
        h = F.relu(F.conv2d(h, p["4.weight"], p["4.bias"], padding=1))
        return F.linear(h.flatten(1), p["7.weight"], p["7.bias"])

    x = torch.randn(2, 3, 4, 4, dtype=D)
    for comp in (ax.composites.epsilon_gamma_box(), ax.composites.epsilon_alpha2_beta1_flat(),
                 {nn.ConvTranspose2d: R.WSquare(), nn.Conv2d: R.ZPlus()}):
        torch.testing.assert_close(ax.lrp(fn, p, x, 2, composite=comp), ax.lrp(f, p, x, 2, composite=comp))


@pytest.mark.parametrize(
    "composite, exc, match",
    [
        (3, TypeError, "composite must be"),
        ({1: R.Pass()}, TypeError, "composite dict keys"),
        ({nn.ReLU: R.ZPlus()}, ValueError, "rule ZPlus does not apply to aten.relu"),
        ({nn.Conv2d: R.GuidedReLU()}, ValueError, "rule GuidedReLU does not apply"),
        (lambda name, layer: "eps", TypeError, "expected a rule from ax.rules"),
    ],
)
def test_bad_composites(composite, exc, match):
    f, p = ax.functionalize(vgg_like(bn=False))
    with pytest.raises(exc, match=match):
        ax.lrp(f, p, torch.randn(1, 3, 16, 16, dtype=D), 0, composite=composite)


def test_unsupported_op_is_named():
    class Sorted(nn.Module):  # (LayerNorm, the earlier example, has rules since issue 16)
        def forward(self, x):
            return x.sort(-1).values

    m = nn.Sequential(nn.Linear(4, 4), Sorted(), nn.Linear(4, 2)).eval()
    f, p = ax.functionalize(m)
    with pytest.raises(ValueError, match=r"lrp has no rule for aten\.sort\.default .* module '1'"):
        ax.lrp(f, p, torch.randn(2, 4), 0)


# ------------------------------------------------------------------- composability


def test_grad_wrt_params_through_lrp_matches_finite_differences():
    m = vgg_like()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    weights = {k: v for k, v in m.named_parameters() if k in ("0.weight", "1.weight", "8.weight", "13.bias")}
    comp = ax.composites.epsilon_gamma_box()

    def loss(w):
        return (ax.lrp(f, {**p, **w}, x, 2, composite=comp) ** 2).sum()

    assert_grad_matches_finite_differences(loss, weights, per_tensor=2, rtol=1e-4)


def test_vmap_over_targets_equals_loop():
    m = resnet_like()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 3, 16, 16, dtype=D)
    ts = torch.tensor([[0, 1], [4, 2], [3, 3]])
    comp = ax.composites.epsilon_plus_flat()
    vm = torch.func.vmap(lambda t: ax.lrp(f, p, x, t, composite=comp))(ts)
    torch.testing.assert_close(vm, torch.stack([ax.lrp(f, p, x, t, composite=comp) for t in ts]))


def test_compiled_lrp_equals_eager_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = resnet_like().float()
    f, p = ax.functionalize(m)
    comp = ax.composites.epsilon_plus_flat()
    counter = CompileCounterWithBackend("aot_eager")
    explain = torch.compile(lambda x, t: ax.lrp(f, p, x, t, composite=comp), backend=counter, fullgraph=True)
    for _ in range(3):
        x = torch.randn(2, 3, 16, 16)
        t = torch.randint(0, 5, (2,))
        torch.testing.assert_close(explain(x, t), ax.lrp(f, p, x, t, composite=comp), rtol=1e-4, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("make", [lambda: ax.composites.epsilon_plus_flat(), lambda: ax.composites.attn_lrp(),
                                  lambda: {torch.nn.Linear: ax.rules.Epsilon(0.25), ax.composites.Kind("add"): ax.rules.Norm()},
                                  lambda: ax.composites.mapping(by_type={torch.nn.Conv2d: ax.rules.ZPlus()},
                                                                first={ax.composites.Kind("layer"): ax.rules.Flat()})],
                         ids=["epsilon_plus_flat", "attn_lrp", "dict", "mapping_first"])
def test_compiled_lrp_with_the_composite_built_inside_equals_eager(make) -> None:
    # dynamo hands assume_constant_result functions a frozen dataclass built inside the compiled function as a
    # default-constructed instance (every field lost): the composite ran silently as Composite() before
    torch._dynamo.reset()
    f, p = ax.functionalize(resnet_like().float())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    explain = torch.compile(lambda x, t: ax.lrp(f, p, x, t, composite=make()), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(explain(x, t), ax.lrp(f, p, x, t, composite=make()), rtol=1e-4, atol=1e-6)


class _Interleave(nn.Module):
    """Moves samples between rows: output row 1 is sample 2 and row 2 sample 1."""

    def __init__(self, mix: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.mix = nn.Linear(4, 6), nn.Linear(6, 3), mix

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.mix:
            h = torch.cat([h[::2], h[1::2]], 0)
        return self.b(h)


@pytest.mark.parametrize("form", ["relevance", "gradient"])
def test_lrp_relevance_follows_samples_the_model_moves_between_rows(form):
    # the relevance form scaled row i of the input relevance by output row i's score: with samples moved between
    # rows, sample 2 got sample 1's score (0.167 off); the seed now carries the score, as the gradient form does
    mixed = _Interleave().double().eval()
    plain = _Interleave(mix=False).double().eval()
    plain.load_state_dict(mixed.state_dict())
    x = torch.randn(4, 4, dtype=torch.float64)
    f, p = ax.functionalize(mixed)
    g, q = ax.functionalize(plain)
    for comp in (None, ax.composites.epsilon_plus()):
        torch.testing.assert_close(ax.lrp(f, p, x, 1, composite=comp, form=form),
                                   ax.lrp(g, q, x, 1, composite=comp, form=form), rtol=1e-12, atol=1e-12)
    conds = [{"a": [0]}, {"a": [1, 2]}]
    torch.testing.assert_close(ax.conditional(f, p, x, 1, conditions=conds), ax.conditional(g, q, x, 1, conditions=conds),
                               rtol=1e-12, atol=1e-12)


def test_compiled_lrp_relevance_form_follows_moved_samples():
    torch._dynamo.reset()
    mixed = _Interleave().eval()
    plain = _Interleave(mix=False).eval()
    plain.load_state_dict(mixed.state_dict())
    x = torch.randn(4, 4)
    f, p = ax.functionalize(mixed)
    g, q = ax.functionalize(plain)
    explain = torch.compile(lambda x: ax.lrp(f, p, x, 1, form="relevance"), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(explain(x), ax.lrp(g, q, x, 1, form="relevance"), rtol=1e-5, atol=1e-6)
