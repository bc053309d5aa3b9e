"""DeepLift, DeepLiftShap, guided backprop, deconvnet."""

import math
import importlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attrax as ax
from attrax.rewrite import program_for, substitute
from attrax.testing import check_completeness, cnns, mlps, relu_cnns, resnets
from conftest import assert_grad_matches_finite_differences, assert_unchanged, module_snapshot

D = torch.float64
ACTS = ("relu", "leaky_relu", "elu", "tanh", "sigmoid", "softplus", "gelu", "silu")


# ------------------------------------------------------------------------- completeness


@settings(max_examples=40)
@given(case=st.one_of(mlps(activations=ACTS), cnns(activations=ACTS, batchnorm=True), resnets(activations=ACTS)))
def test_deeplift_completeness_random_networks(case):
    attr = ax.deeplift(case.model_fn, case.params, case.x, case.target, baseline=case.baseline)
    check_completeness(case, attr, baseline=case.baseline, rtol=1e-5, atol=1e-5)


@settings(max_examples=20)
@given(case=resnets(activations=ACTS, softmax=True, batchnorm=True))
def test_deeplift_completeness_with_softmax_outputs(case):
    attr = ax.deeplift(case.model_fn, case.params, case.x, case.target, baseline=case.baseline)
    check_completeness(case, attr, baseline=case.baseline, rtol=1e-5, atol=1e-5)


def test_deeplift_exact_toy_values():
    # f(x) = relu(x1 - x2) with x = (3, 1), x' = (0, 0): dy = 2, dx = (3, 1), the multiplier of the
    # relu is 2 / 2 = 1, so DeepLift = (3 * 1, 1 * -1) = (3, -1).
    def fn(p, x):
        return torch.relu(x[:, 0] - x[:, 1]).unsqueeze(1)

    x = torch.tensor([[3.0, 1.0]], dtype=D)
    torch.testing.assert_close(ax.deeplift(fn, {}, x, None), torch.tensor([[3.0, -1.0]], dtype=D))
    # with x' = (0, 2): the pre-activation moves from -2 to 2 (dz = 4) while relu moves from 0 to 2
    # (dy = 2), multiplier 1/2; dx = (3, -1) and dz/dx = (1, -1), so DeepLift = (1.5, 0.5), sum 2 = dy.
    torch.testing.assert_close(
        ax.deeplift(fn, {}, x, None, baseline=torch.tensor([0.0, 2.0], dtype=D)), torch.tensor([[1.5, 0.5]], dtype=D)
    )
    # multiply_by_inputs=False returns the multipliers
    torch.testing.assert_close(ax.deeplift(fn, {}, x, None, multiply_by_inputs=False), torch.tensor([[1.0, -1.0]], dtype=D))


def test_maxpool_with_equal_input_and_reference_at_the_max():
    # window (x) = (5, 1), reference (5, 7): the input equals the reference at its own max, the output
    # changes by 5 - 7 = -2. The difference must go to the reference's argmax (position 1, where
    # dx = -6): multiplier 1/3, attribution (0, -2). Gradient-at-x fallbacks lose it.
    def fn(p, x):
        return F.max_pool1d(x.unsqueeze(1), 2).reshape(x.shape[0], 1)

    x = torch.tensor([[5.0, 1.0]], dtype=D)
    b = torch.tensor([[5.0, 7.0]], dtype=D)
    torch.testing.assert_close(ax.deeplift(fn, {}, x, None, baseline=b), torch.tensor([[0.0, -2.0]], dtype=D))


def test_softmax_is_row_wise_and_exact():
    # softmax outputs: completeness holds per sample, and one sample's attribution does not depend
    # on what else is in the batch (whole-tensor normalisation would mix them)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Softmax(dim=1)).double().eval()
    f, p = ax.functionalize(m)
    x, b = torch.randn(4, 4, dtype=D), torch.randn(4, 4, dtype=D)
    a = ax.deeplift(f, p, x, 2, baseline=b)
    assert ax.metrics.completeness_delta(f, p, x, 2, a, baseline=b).abs().max() < 1e-12
    torch.testing.assert_close(a[:1], ax.deeplift(f, p, x[:1], 2, baseline=b[:1]))
    ls = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)).double().eval()
    f2, p2 = ax.functionalize(ls)
    a2 = ax.deeplift(f2, p2, x, 0, baseline=b)
    assert ax.metrics.completeness_delta(f2, p2, x, 0, a2, baseline=b).abs().max() < 1e-12


def test_products_of_activations_are_exact():
    def fn(p, x):  # gating and attention-like products
        h = x @ p["w"]
        gate = torch.sigmoid(x @ p["v"])
        att = torch.softmax((h.unsqueeze(2) @ h.unsqueeze(1)), dim=-1) @ h.unsqueeze(2)
        return (h * gate + att.squeeze(2) / (1 + gate * gate)).sum(1, keepdim=True)

    torch.manual_seed(1)
    p = {"w": torch.randn(3, 4, dtype=D), "v": torch.randn(3, 4, dtype=D)}
    x, b = torch.randn(5, 3, dtype=D), torch.randn(5, 3, dtype=D)
    a = ax.deeplift(fn, p, x, None, baseline=b)
    delta = ax.metrics.completeness_delta(fn, p, x, None, a, baseline=b)
    assert delta.abs().max() < 1e-10


# ------------------------------------------------------- softmax at the logit gaps of classifiers

GAPS = (1.0, 10.0, 100.0, 1e3, 1e4)


def _completeness_errors(f, p, x, b, n_out, log):
    """Per target and sample, ``|sum(a) - (f(x) - f(x'))|`` over the scale of what is summed; the largest.

    The scale is ``sum |a_i|`` (the terms of the sum) plus how precisely the two outputs are known:
    a log-softmax output ``z`` to rounding of ``|z|``, a softmax output ``y = exp(z)`` so to
    rounding of ``|y| (1 + |log y|)`` (a class 80 nats down is computed to 80 eps, relative). Less
    an absolute floor ``tiny * (1 + sum |x_i - x'_i|)`` (``tiny``: the dtype's smallest normal
    number): a multiplier below it is subnormal, so ``(x_i - x'_i) m_i`` has an absolute precision of
    about that (targets with probability 1e-38 in float32).
    """
    tiny = torch.finfo(x.dtype).tiny
    with torch.no_grad():
        fx, fb = f(p, x), f(p, b)
    known = (lambda o: o.abs()) if log else (lambda y: y.abs() * (1 - torch.log(y.abs().clamp(min=tiny))))
    floor = tiny * (1 + (x - b).flatten(1).abs().sum(1))
    worst = torch.zeros((), dtype=x.dtype)
    for t in range(n_out):
        a = ax.deeplift(f, p, x, t, baseline=b)
        assert torch.isfinite(a).all(), f"non-finite attribution for target {t}"
        delta = a.flatten(1).sum(1) - (fx[:, t] - fb[:, t])
        scale = a.flatten(1).abs().sum(1) + known(fx[:, t]) + known(fb[:, t]) + tiny
        worst = torch.maximum(worst, ((delta.abs() - floor).clamp(min=0) / scale).max())
    return float(worst)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", [nn.Softmax, nn.LogSoftmax])
def test_softmax_rule_is_exact_at_large_logit_gaps(op, dtype):
    # Issue 15.9: one max-shift shared by both streams made exp(x' - c) underflow and the terms cancel:
    # softmax at x = [20, 0], x' = 0 gave [0, -0] for a change of 0.5, NaN from a gap of 100 (float32),
    # log-softmax NaN at 200. Trained classifiers have logit gaps of 10 to 1e4.
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    log = op is nn.LogSoftmax
    torch.manual_seed(0)
    f, p = ax.functionalize(op(dim=1))
    gen = torch.Generator().manual_seed(0)
    for gap in GAPS:
        x = gap * torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0.5, -1], [-1, 1, 0.3]], dtype=dtype)
        for b in (torch.zeros_like(x), x.flip(1), x + 1, 0.5 * x):
            assert _completeness_errors(f, p, x, b, 3, log) <= rtol, (gap, b)
        # random multi-class rows at this scale: independent baselines, zero, and a nearby one
        xr = gap * torch.randn(16, 10, generator=gen, dtype=dtype)
        for b in (gap * torch.randn(16, 10, generator=gen, dtype=dtype), torch.zeros_like(xr),
                  xr + torch.randn(16, 10, generator=gen, dtype=dtype)):
            assert _completeness_errors(f, p, xr, b, 10, log) <= rtol, gap
        # large logits made by a layer: the multipliers also pass through its transpose
        m = nn.Sequential(nn.Linear(6, 10), op(dim=1)).to(dtype).eval()
        with torch.no_grad():
            m[0].weight.mul_(gap)
        f2, p2 = ax.functionalize(m)
        xi = torch.randn(16, 6, generator=gen, dtype=dtype)
        for b in (torch.zeros_like(xi), torch.randn(16, 6, generator=gen, dtype=dtype)):
            assert _completeness_errors(f2, p2, xi, b, 10, log) <= rtol, gap


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_rule_values_at_large_gaps(dtype):
    # x = [gap, 0], x' = 0: only the first logit moves, so it receives the whole change of the output
    for gap in GAPS:
        x = torch.tensor([[gap, 0.0]], dtype=dtype)
        for op in (nn.Softmax(dim=1), nn.LogSoftmax(dim=1)):
            f, p = ax.functionalize(op)
            with torch.no_grad():
                df = f(p, x) - f(p, torch.zeros_like(x))
            for t in (0, 1):
                want = torch.tensor([[float(df[0, t]), 0.0]], dtype=dtype)
                torch.testing.assert_close(ax.deeplift(f, p, x, t), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("op", [nn.Softmax, nn.LogSoftmax])
def test_softmax_rule_gradients_at_large_gaps(op):
    # the rule stays differentiable where it used to overflow: the gradient of an attribution loss is
    # finite at logit gaps of 1e3 (float32), and equals finite differences at gaps of ~50 (float64)
    torch.manual_seed(14)
    m = nn.Sequential(nn.Linear(4, 5), op(dim=1)).eval()
    with torch.no_grad():
        m[0].weight.mul_(1e3)
    f, p = ax.functionalize(m)
    x, b = torch.randn(3, 4), torch.randn(3, 4)
    weights = dict(m.named_parameters())
    for t in range(5):
        grads = torch.func.grad(lambda w: (ax.deeplift(f, {**p, **w}, x, t, baseline=b) ** 2).sum())(weights)
        assert all(torch.isfinite(g).all() for g in grads.values())
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), op(dim=1)).double().eval()
    with torch.no_grad():
        m[2].weight.mul_(20)
    f, p = ax.functionalize(m)
    x, b = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    weights = dict(m.named_parameters())
    assert_grad_matches_finite_differences(lambda w: (ax.deeplift(f, {**p, **w}, x, 2, baseline=b) ** 2).sum(), weights)


# ------------------------------------------------------------------- float16 / bfloat16 models


class _LlamaBlock(nn.Module):
    """Attention (softmax, products of activations) and a SiLU-gated MLP with residual adds; no norm layer."""

    def __init__(self, d, heads):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w1, self.w3, self.w2 = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (lin(x).view(b, t, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Llama(nn.Module):
    def __init__(self, d=32, heads=4, blocks=2, classes=5):
        super().__init__()
        self.blocks = nn.Sequential(*(_LlamaBlock(d, heads) for _ in range(blocks)))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(F.gelu(self.blocks(x)).mean(1))


class _GatedMLP(nn.Module):
    """Sums of products of two activations (x * y gating: the Bilinear rule) behind ReLU, GELU, SiLU, tanh, sigmoid."""

    def __init__(self, d=64, width=256, classes=5):
        super().__init__()
        self.a, self.b, self.c, self.e = (nn.Linear(d, width) for _ in range(4))
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        a, e = self.a(x), self.e(x)
        return self.out(F.silu(a) * self.b(x) + torch.tanh(self.c(x)) * torch.sigmoid(e) + F.relu(a) * F.gelu(e))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model, shape", [(_Llama, (4, 8, 32)), (_GatedMLP, (8, 64))])
def test_low_precision_deeplift_is_within_rounding_of_float32(model, shape, dtype):
    # Issue 15.5: with float16/bfloat16 streams the secants, divisions and the cotangents themselves were
    # rounded to the stream's precision at every node (a bf16 Llama-style model: sum(attr) 0.386 for a
    # change of 0.018). Now the rules compute in float32 and the result comes back in x's dtype.
    # Reference: the float32 DeepLift of the same model, weights and inputs upcast (exactly) to float32.
    # u is the unit roundoff of the low precision; the forward streams themselves are rounded to it,
    # and so is the returned attribution, so nothing better than O(u) is possible.
    # - completeness: |sum(a) - (f(x) - f(x'))| <= 3 u ||a32||_2, with f(x) - f(x') in float32: summing
    #   n terms each rounded to u errs by about u ||a||_2 (random signs), not u sum|a_i|;
    # - every attribution within 1.5 u max|a32| of the float32 one (1 u is the output rounding alone).
    # Measured: at most 1.8 u and 1.0 u here; before, up to 3.4 u and 2.0 u to 96 u (float16, nearby baseline).
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.manual_seed(1)
    low = model().eval().to(dtype)
    f, p = ax.functionalize(low)
    up = {k: v.float() for k, v in p.items()}
    x = torch.randn(shape)
    t = torch.arange(shape[0]) % 5
    rows = torch.arange(shape[0])
    for b in (torch.zeros(shape), 0.5 * torch.randn(shape), x + 0.01 * torch.randn(shape)):
        xl, bl = x.to(dtype), b.to(dtype)
        a = ax.deeplift(f, p, xl, t, baseline=bl)
        assert a.dtype == dtype and a.shape == x.shape
        a32 = ax.deeplift(f, up, xl.float(), t, baseline=bl.float())
        with torch.no_grad():
            df = f(up, xl.float())[rows, t] - f(up, bl.float())[rows, t]
        a, a32 = a.float().flatten(1), a32.flatten(1)
        assert ((a.sum(1) - df).abs() <= 3 * u * a32.norm(dim=1)).all(), ((a.sum(1) - df).abs() / (u * a32.norm(dim=1)))
        assert ((a - a32).abs().amax(1) <= 1.5 * u * a32.abs().amax(1)).all(), (a - a32).abs().amax(1) / (u * a32.abs().amax(1))
    # the other entry points keep the input's dtype too
    xl = x.to(dtype)
    assert ax.deeplift(f, p, xl, t, multiply_by_inputs=False).dtype == dtype
    assert ax.deeplift_shap(f, p, xl, t, torch.randn(3, *shape[1:]).to(dtype), chunk_size=2).dtype == dtype


# ---------------------------------------------------------------------- ReLU spellings


class Spelled(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.r1, self.r2 = nn.ReLU(), nn.ReLU()
        self.shared = nn.ReLU()
        self.inplace = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)

    def act(self, h, which):
        how = self.how
        if how == "module":
            return (self.r1 if which == 1 else self.r2)(h)
        if how == "reused_module":
            return self.shared(h)
        if how == "F.relu":
            return F.relu(h)
        if how == "torch.relu":
            return torch.relu(h)
        if how == "x.relu()":
            return h.relu()
        if how == "inplace_module":
            return self.inplace(h)
        if how == "F.relu_inplace":
            return F.relu(h, inplace=True)
        if how == "torch.relu_":
            torch.relu_(h)
            return h
        if how == "x.relu_()":
            return h.relu_()
        if how == "x.clamp(min=0)":
            return h.clamp(min=0)
        if how == "torch.clamp(x, 0.0)":
            return torch.clamp(h, 0.0)
        if how == "x.clamp_min(0)":
            return h.clamp_min(0)
        if how == "x.clamp_(min=0)":
            return h.clamp_(min=0)
        if how == "F.threshold(x, 0, 0)":
            return F.threshold(h, 0.0, 0.0)
        if how == "nn.Threshold(0, 0)":
            return nn.Threshold(0, 0)(h)
        if how == "F.hardtanh(x, 0, inf)":
            return F.hardtanh(h, 0.0, math.inf)
        if how == "torch.clip(x, 0)":
            return torch.clip(h, 0)
        if how == "x.clamp(0, inf)":
            return h.clamp(0, math.inf)
        raise AssertionError(how)

    def forward(self, x):
        h = self.pool(self.act(self.c1(x), 1))
        h = self.act(self.c2(h), 2)
        return self.fc(torch.flatten(h, 1))


SPELLINGS = ["reused_module", "F.relu", "torch.relu", "x.relu()", "inplace_module", "F.relu_inplace", "torch.relu_", "x.relu_()",
             # the same function spelled without relu: guided backprop and deconvnet gave these the plain gradient
             "x.clamp(min=0)", "torch.clamp(x, 0.0)", "x.clamp_min(0)", "x.clamp_(min=0)", "F.threshold(x, 0, 0)",
             "nn.Threshold(0, 0)", "F.hardtanh(x, 0, inf)", "torch.clip(x, 0)", "x.clamp(0, inf)"]


@pytest.mark.parametrize("how", SPELLINGS)
def test_every_relu_spelling_gives_the_module_result(how):
    torch.manual_seed(0)
    ref = Spelled("module").double().eval()
    other = Spelled(how).double().eval()
    other.load_state_dict(ref.state_dict())
    x, b = torch.randn(3, 2, 8, 8, dtype=D), torch.randn(3, 2, 8, 8, dtype=D) * 0.5
    fr, pr = ax.functionalize(ref)
    fo, po = ax.functionalize(other)
    t = torch.tensor([0, 2, 1])
    want = ax.deeplift(fr, pr, x, t, baseline=b)
    got = ax.deeplift(fo, po, x, t, baseline=b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert ax.metrics.completeness_delta(fo, po, x, t, got, baseline=b).abs().max() < 1e-10
    for method in (ax.guided_backprop, ax.deconvnet):
        torch.testing.assert_close(method(fo, po, x, t), method(fr, pr, x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        ax.deeplift_shap(fo, po, x, t, b, chunk_size=2), ax.deeplift_shap(fr, pr, x, t, b, chunk_size=2), rtol=1e-12, atol=1e-12
    )


def test_relu_is_recognised_only_where_the_op_is_relu():
    # clamp/threshold are a ReLU only with a zero lower bound, no upper bound and a zero replacement value;
    # the others keep their own rules (the gradient under guided backprop, the secant under DeepLift)
    ops = {"relu": torch.relu, "clamp0": lambda h: h.clamp(min=0), "clamp_min0": lambda h: h.clamp_min(0.0),
           "threshold00": lambda h: F.threshold(h, 0, 0), "clamp06": lambda h: h.clamp(0, 6),
           "clamp_min1": lambda h: h.clamp_min(0.1), "clamp_max0": lambda h: h.clamp(max=0),
           "threshold01": lambda h: F.threshold(h, 0.0, 1.0), "threshold10": lambda h: F.threshold(h, 1.0, 0.0),
           "hardtanh": F.relu6, "leaky": F.leaky_relu}

    def model_fn(p, x):
        return torch.stack([op(x * (k + 1)) for k, op in enumerate(ops.values())], 1)

    program = program_for(model_fn, {}, (torch.randn(2, 3),), "test")
    calls = [n for n in program.nodes if n.op == "call" and n.packet not in ("mul", "stack")]
    assert [ax.rules.is_relu(n) for n in calls] == [k in ("relu", "clamp0", "clamp_min0", "threshold00") for k in ops]


@pytest.mark.parametrize("make, op", [(lambda: nn.RNN(3, 5, batch_first=True, nonlinearity="relu"), "aten.rnn_relu.input"),
                                      (lambda: nn.RNNCell(3, 5, nonlinearity="relu"), "aten.rnn_relu_cell.default")])
def test_ops_with_a_relu_inside_are_refused_not_given_the_gradient(make, op):
    # the ReLUs inside aten.rnn_relu get no guided/deconv rule: the result was the plain gradient (0.27 off
    # the same RNN unrolled with torch.relu); refused by name, as DeepLift and LRP refuse the op
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = make(), nn.Linear(5, 2)

        def forward(self, x):
            h = self.rnn(x)
            return self.head(h[0][:, -1] if isinstance(h, tuple) else h)

    torch.manual_seed(0)
    f, p = ax.functionalize(Head().double().eval())
    x = torch.randn(4, 6, 3, dtype=D) if "rnn_relu.input" in op else torch.randn(4, 3, dtype=D)
    for method in (ax.guided_backprop, ax.deconvnet, ax.deeplift):
        with pytest.raises(ValueError, match=f"{method.__name__} has no rule for {op}"):
            method(f, p, x, 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer", [nn.RNN, nn.GRU, nn.LSTM])
def test_guided_backprop_is_the_gradient_through_fused_ops_without_a_relu(layer, dtype):
    # no ReLU inside nn.RNN(tanh), nn.GRU or nn.LSTM: guided backprop and deconvnet pass their gradient, as Captum
    # does. In float32 on CPU the eval-mode kernel is oneDNN's, whose backward needs a workspace only training makes
    # ("got None for argument 'workspace'")
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = layer(3, 5, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0][:, -1]

    torch.manual_seed(0)
    f, p = ax.functionalize(Head().to(dtype).eval())
    x = torch.randn(4, 6, 3, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for method in (ax.guided_backprop, ax.deconvnet):
        torch.testing.assert_close(method(f, p, x, 1), ax.gradient(f, p, x, 1), rtol=tol, atol=tol)


# -------------------------------------------------------------------------- invariances

RULE_METHODS = {
    "deeplift": lambda f, p, x, t, b: ax.deeplift(f, p, x, t, baseline=b[:1]),
    "deeplift_shap": lambda f, p, x, t, b: ax.deeplift_shap(f, p, x, t, b),
    "guided_backprop": lambda f, p, x, t, b: ax.guided_backprop(f, p, x, t),
    "deconvnet": lambda f, p, x, t, b: ax.deconvnet(f, p, x, t),
}


@pytest.mark.parametrize("method", RULE_METHODS)
def test_batch_invariance_with_batchnorm_and_softmax(method):
    torch.manual_seed(3)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4), nn.Softmax(1)
    ).double().eval()
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2)
    f, p = ax.functionalize(m)
    x = torch.randn(4, 2, 4, 4, dtype=D)
    b = torch.randn(3, 2, 4, 4, dtype=D)
    t = torch.tensor([0, 3, 1, 2])
    call = RULE_METHODS[method]
    whole = call(f, p, x, t, b)
    for i in range(4):
        torch.testing.assert_close(whole[i : i + 1], call(f, p, x[i : i + 1], t[i : i + 1], b), rtol=1e-12, atol=1e-12)


def test_deeplift_shap_is_the_mean_of_deeplift_and_chunk_invariant():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ELU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)).double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 1, 6, 6, dtype=D)
    bl = torch.randn(5, 1, 6, 6, dtype=D)
    t = torch.tensor([2, 0, 1])
    mean = torch.stack([ax.deeplift(f, p, x, t, baseline=b) for b in bl]).mean(0)
    ref = ax.deeplift_shap(f, p, x, t, bl)
    torch.testing.assert_close(ref, mean, rtol=1e-12, atol=1e-12)
    for cs in (1, 3):
        torch.testing.assert_close(ax.deeplift_shap(f, p, x, t, bl, chunk_size=cs), ref, rtol=1e-12, atol=1e-13)


def test_vmap_over_baselines_of_deeplift_equals_loop():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(4, 6), nn.Softplus(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 4, dtype=D)
    bs = torch.randn(5, 3, 4, dtype=D)
    vm = torch.func.vmap(lambda b: ax.deeplift(f, p, x, 1, baseline=b))(bs)
    torch.testing.assert_close(vm, torch.stack([ax.deeplift(f, p, x, 1, baseline=b) for b in bs]), rtol=1e-12, atol=1e-12)


def test_vmap_over_targets_of_rule_methods_equals_loop():
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 4, dtype=D)
    ts = torch.tensor([[0, 1, 2], [2, 2, 1]])
    for method in (ax.deeplift, ax.guided_backprop, ax.deconvnet):
        vm = torch.func.vmap(lambda t: method(f, p, x, t))(ts)
        torch.testing.assert_close(vm, torch.stack([method(f, p, x, t) for t in ts]))


# ------------------------------------------------------------------------ composability


def test_grad_wrt_params_through_deeplift_matches_finite_differences():
    torch.manual_seed(7)
    m = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8, 3), nn.Softmax(1),
    ).double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 1, 4, 4, dtype=D)
    b = torch.randn(2, 1, 4, 4, dtype=D) * 0.3
    weights = dict(m.named_parameters())

    def loss(w):
        return (ax.deeplift(f, {**p, **w}, x, 1, baseline=b) ** 2).sum()

    assert_grad_matches_finite_differences(loss, weights)


def test_compiled_deeplift_equals_eager_and_does_not_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(8)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3), nn.Softmax(1)).eval()
    f, p = ax.functionalize(m)
    counter = CompileCounterWithBackend("aot_eager")
    explain = torch.compile(lambda x, t: ax.deeplift(f, p, x, t), backend=counter, fullgraph=True)
    for _ in range(3):
        x = torch.randn(3, 2, 4, 4)
        t = torch.randint(0, 3, (3,))
        torch.testing.assert_close(explain(x, t), ax.deeplift(f, p, x, t), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("method", list(RULE_METHODS))
def test_module_unchanged(method):
    m = Spelled("inplace_module").double().eval()
    m.c1.register_full_backward_hook(lambda *a: None)  # (forward hooks are refused: tests/test_trust.py)
    before = module_snapshot(m)
    f, p = ax.functionalize(m)
    x = torch.randn(2, 2, 8, 8, dtype=D)
    keep = x.clone()
    RULE_METHODS[method](f, p, x, 1, torch.zeros(2, 2, 8, 8, dtype=D))
    assert_unchanged(m, before)
    assert torch.equal(x, keep)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda f, p, x: ax.deeplift(f, p, x, 5), ValueError, r"target 5 is out of range for output of shape \(2, 3\)"),
        (lambda f, p, x: ax.deeplift(f, p, x, 0, baseline=torch.zeros(3, 2, 8, 8)), ValueError, "baseline of shape"),
        (lambda f, p, x: ax.deeplift_shap(f, p, x, 0, torch.zeros(4, 3, 8, 8, dtype=D)), ValueError, "baselines must have shape"),
        (lambda f, p, x: ax.deeplift_shap(f, p, x, 0, torch.zeros(4, 2, 8, 8, dtype=D), chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (lambda f, p, x: ax.guided_backprop(f, p, x, None), ValueError, "target is None"),
        (lambda f, p, x: ax.deconvnet(f, p, x.float().long(), 0), TypeError, "floating point"),
    ],
)
def test_rule_methods_bad_inputs(call, exc, match):
    f, p = ax.functionalize(Spelled("module").double().eval())
    with pytest.raises(exc, match=match):
        call(f, p, torch.randn(2, 2, 8, 8, dtype=D))


# ------------------------------------------------------------------------ captum parity


def _captum():
    return pytest.importorskip("captum.attr")


def rg(x):
    return x.detach().clone().requires_grad_()


def captum_safe_model():
    """Distinct nn.ReLU modules, each used once; no maxpool/softmax special cases."""
    torch.manual_seed(9)
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 3),
    ).double().eval()
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2)
    return m


def test_deeplift_and_shap_match_captum_where_captum_is_right():
    ca = _captum()
    m = captum_safe_model()
    f, p = ax.functionalize(m)
    torch.manual_seed(10)
    x, b = torch.randn(3, 2, 8, 8, dtype=D), torch.randn(3, 2, 8, 8, dtype=D) * 0.5
    t = torch.tensor([0, 2, 1])
    torch.testing.assert_close(
        ax.deeplift(f, p, x, t, baseline=b), ca.DeepLift(m).attribute(rg(x), baselines=b, target=t), rtol=1e-5, atol=1e-8
    )
    torch.testing.assert_close(
        ax.deeplift(f, p, x, t, baseline=b, multiply_by_inputs=False),
        ca.DeepLift(m, multiply_by_inputs=False).attribute(rg(x), baselines=b, target=t), rtol=1e-5, atol=1e-8,
    )
    bl = torch.randn(4, 2, 8, 8, dtype=D)
    torch.testing.assert_close(
        ax.deeplift_shap(f, p, x, t, bl), ca.DeepLiftShap(m).attribute(rg(x), baselines=bl, target=t), rtol=1e-5, atol=1e-8
    )


def test_captum_surface_local_shap_deltas_and_callable_baselines():
    # issue 18: multiply_by_inputs=False for DeepLiftShap, return_convergence_delta, callable baselines
    ca = _captum()
    m = captum_safe_model()
    f, p = ax.functionalize(m)
    torch.manual_seed(11)
    x, b = torch.randn(3, 2, 8, 8, dtype=D), torch.randn(3, 2, 8, 8, dtype=D) * 0.5
    t = torch.tensor([0, 2, 1])
    bl = torch.randn(4, 2, 8, 8, dtype=D)
    torch.testing.assert_close(
        ax.deeplift_shap(f, p, x, t, bl, multiply_by_inputs=False),
        ca.DeepLiftShap(m, multiply_by_inputs=False).attribute(rg(x), baselines=bl, target=t), rtol=1e-5, atol=1e-8)
    attr, delta = ax.deeplift(f, p, x, t, baseline=b, return_convergence_delta=True)
    c_attr, c_delta = ca.DeepLift(m).attribute(rg(x), baselines=b, target=t, return_convergence_delta=True)
    torch.testing.assert_close(attr, c_attr, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(delta, c_delta, rtol=0, atol=1e-8)  # same sign convention
    torch.testing.assert_close(delta, ax.metrics.completeness_delta(f, p, x, t, attr, baseline=b))
    attr, delta = ax.deeplift_shap(f, p, x, t, bl, return_convergence_delta=True, chunk_size=3)
    with torch.no_grad():
        span = f(p, x).gather(1, t[:, None])[:, 0] - f(p, bl)[:, t].mean(0)
    torch.testing.assert_close(delta, attr.flatten(1).sum(1) - span)
    assert delta.abs().max() < 1e-9
    # callable baselines: evaluated on x
    torch.testing.assert_close(ax.deeplift(f, p, x, t, baseline=lambda x: 0.5 * x),
                               ax.deeplift(f, p, x, t, baseline=0.5 * x))
    torch.testing.assert_close(ax.deeplift_shap(f, p, x, t, lambda x: bl), ax.deeplift_shap(f, p, x, t, bl))
    with pytest.raises(ValueError, match="needs multiply_by_inputs=True"):
        ax.deeplift(f, p, x, t, multiply_by_inputs=False, return_convergence_delta=True)
    with pytest.raises(ValueError, match="finite"):
        ax.deeplift(f, p, x, t, baseline=torch.full_like(x, float("nan")))
    ax.deeplift(f, p, x, t, baseline=torch.full_like(x, float("nan")), check_finite=False)  # told otherwise


def test_guided_backprop_and_deconvnet_match_captum():
    ca = _captum()
    m = captum_safe_model()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 2, 8, 8, dtype=D)
    t = torch.tensor([1, 0, 2])
    torch.testing.assert_close(ax.guided_backprop(f, p, x, t), ca.GuidedBackprop(m).attribute(rg(x), target=t), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ax.deconvnet(f, p, x, t), ca.Deconvolution(m).attribute(rg(x), target=t), rtol=1e-5, atol=1e-8)


class ClampReLU(nn.Module):
    def forward(self, h):
        return h.clamp(min=0)


def test_guided_backprop_and_deconvnet_match_captum_with_relu_spelled_as_clamp():
    # Captum's nn.ReLU model is the reference for the same model with every ReLU written x.clamp(min=0); the
    # LRP composites of the same names agree (times the target score, Zennit's convention)
    ca = _captum()
    m = captum_safe_model()
    clamped = nn.Sequential(*[ClampReLU() if isinstance(layer, nn.ReLU) else layer for layer in m]).eval()
    f, p = ax.functionalize(clamped)
    x = torch.randn(3, 2, 8, 8, dtype=D)
    t = torch.tensor([1, 0, 2])
    with torch.no_grad():
        score = m(x).gather(1, t[:, None]).reshape(-1, 1, 1, 1)
    for method, theirs, composite in [(ax.guided_backprop, ca.GuidedBackprop, ax.composites.guided_backprop),
                                      (ax.deconvnet, ca.Deconvolution, ax.composites.deconvnet)]:
        ours = method(f, p, x, t)
        torch.testing.assert_close(ours, theirs(m).attribute(rg(x), target=t), rtol=1e-5, atol=1e-8)
        assert (ours - ax.gradient(f, p, x, t)).abs().max() > 1e-3  # the rule changed something here
        torch.testing.assert_close(ax.lrp(f, p, x, t, composite=composite()), score * ours, rtol=1e-10, atol=1e-12)


def test_captum_deeplift_is_silently_a_gradient_for_functional_relu():
    # Captum hooks nn.ReLU modules only: with F.relu its DeepLift quietly uses the gradient and
    # loses completeness. attrax sees every call site.
    ca = _captum()
    torch.manual_seed(11)
    m = Spelled("F.relu").double().eval()
    f, p = ax.functionalize(m)
    x, b = torch.randn(4, 2, 8, 8, dtype=D), torch.randn(4, 2, 8, 8, dtype=D)
    t = torch.tensor([0, 1, 2, 0])
    ours = ax.deeplift(f, p, x, t, baseline=b)
    theirs = ca.DeepLift(m).attribute(rg(x), baselines=b, target=t).detach()
    assert ax.metrics.completeness_delta(f, p, x, t, ours, baseline=b).abs().max() < 1e-10
    assert ax.metrics.completeness_delta(f, p, x, t, theirs, baseline=b).abs().max() > 1e-3


def test_captum_deeplift_fails_on_a_reused_relu_module():
    ca = _captum()
    m = Spelled("reused_module").double().eval()
    f, p = ax.functionalize(m)
    x, b = torch.randn(2, 2, 8, 8, dtype=D), torch.zeros(2, 2, 8, 8, dtype=D)
    ours = ax.deeplift(f, p, x, 1, baseline=b)
    assert ax.metrics.completeness_delta(f, p, x, 1, ours, baseline=b).abs().max() < 1e-10
    try:
        theirs = ca.DeepLift(m).attribute(rg(x), baselines=b, target=1).detach()
    except RuntimeError:
        return  # Captum refuses the model (measured on captum 0.9.0)
    assert ax.metrics.completeness_delta(f, p, x, 1, theirs, baseline=b).abs().max() > 1e-6


# ------------------------------------------------------------- fused ReLU -> max-pool rule

_dl = importlib.import_module("attrax.deeplift")


def unfused(method, *args, **kwargs):
    """``method`` with the full-size cross-max rule at every max pool (then the ReLU's rescale rule)."""
    with mock.patch.object(_dl, "disjoint_max_pool", lambda *a: False):
        return method(*args, **kwargs)


def pool_rules(module, x):
    f, p = ax.functionalize(module)
    program = program_for(f, p, (x,))
    plan = substitute(program, _dl.deeplift_rule, "deeplift")
    return [type(plan[n.index]).__name__ for n in program.nodes if n.packet in ("max_pool2d", "max_pool3d")]


class _Pools(nn.Module):
    def __init__(self, pool, nd=2, act="relu"):
        super().__init__()
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        self.c1, self.c2 = conv(2, 3, 3, padding=1), conv(3, 3, 3, padding=1)
        self.pool = pool
        self.fc = nn.LazyLinear(3)
        self.act = {"relu": (F.relu, torch.relu), "tanh": (torch.tanh, torch.tanh), "elu": (F.elu, F.elu)}[act]

    def forward(self, x):
        h = self.pool(self.act[0](self.c1(x)))
        return self.fc(self.pool(self.act[1](self.c2(h))).flatten(1))


class _ReluTwice(nn.Module):  # the ReLU output also feeds a skip: the pool cannot own it
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return (F.max_pool2d(h, 2) + F.avg_pool2d(h, 2)).flatten(1)


def _built(module, x):
    with torch.no_grad():
        module(x)  # materialise lazy layers
    return module.double().eval()


def test_pooled_resolution_rules_are_chosen_only_where_windows_are_disjoint():
    x2, x3 = torch.randn(2, 2, 8, 8, dtype=D), torch.randn(2, 2, 8, 8, 8, dtype=D)
    assert pool_rules(_built(_Pools(nn.MaxPool2d(2)).double(), x2), x2) == ["ReluMaxPool"] * 2
    assert pool_rules(_built(_Pools(nn.MaxPool2d(2, stride=3)).double(), x2), x2) == ["ReluMaxPool"] * 2
    assert pool_rules(_built(_Pools(nn.MaxPool3d(2), nd=3).double(), x3), x3) == ["ReluMaxPool"] * 2
    # overlapping windows (ResNet stem), dilated windows that interleave, a shared ReLU output
    assert pool_rules(_built(_Pools(nn.MaxPool2d(3, 2, 1)).double(), x2), x2) == ["CrossMax"] * 2
    assert pool_rules(_built(_Pools(nn.MaxPool2d(2, 2, dilation=2)).double(), x2), x2) == ["CrossMax"] * 2
    assert pool_rules(_ReluTwice().double().eval(), x2) == ["DisjointCrossMax"]
    # a disjoint max pool after another activation: cross-max at the pooled resolution
    m = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten()).double().eval()
    assert pool_rules(m, x2) == ["DisjointCrossMax"]


def _edge_baselines(x, gen):
    """Baselines that hit every branch: random, zero, equal to x, equal to x on half the image, x shifted."""
    b = torch.randn(x.shape, generator=gen, dtype=x.dtype) * 0.5
    half = x.clone()
    half[..., : x.shape[-1] // 2] = b[..., : x.shape[-1] // 2]
    return [b, torch.zeros_like(x), x.clone(), half, x + 1.0, x.round()]


@pytest.mark.parametrize("act", ["relu", "tanh", "elu"])
@pytest.mark.parametrize(
    "pool, nd",
    [(nn.MaxPool2d(2), 2), (nn.MaxPool2d(2, stride=3), 2), (nn.MaxPool2d(2, padding=1), 2),
     (nn.MaxPool2d(3, ceil_mode=True), 2), (nn.MaxPool3d(2), 3)],
)
def test_pooled_resolution_rules_equal_crossmax_then_rescale_on_edge_cases(pool, nd, act):
    torch.manual_seed(12)
    shape = (3, 2, 8, 8) if nd == 2 else (2, 2, 6, 6, 6)
    x = torch.randn(shape, dtype=D)
    x[0] = x[0].round()  # ties inside windows
    x[1, :, :2] = -5.0  # dead ReLUs: whole windows at zero
    m = _built(_Pools(pool, nd, act).double(), x)
    assert pool_rules(m, x) == ["ReluMaxPool" if act == "relu" else "DisjointCrossMax"] * 2
    f, p = ax.functionalize(m)
    gen = torch.Generator().manual_seed(0)
    for b in _edge_baselines(x, gen):
        for mbi in (False, True):
            ours = ax.deeplift(f, p, x, 1, baseline=b, multiply_by_inputs=mbi)
            ref = unfused(ax.deeplift, f, p, x, 1, baseline=b, multiply_by_inputs=mbi)
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
        delta = ax.metrics.completeness_delta(f, p, x, 1, ours, baseline=b)  # ours: attributions
        assert delta.abs().max() < 1e-12
    # x == x': the multipliers are the gradient
    grad = torch.func.grad(lambda xx: f(p, xx)[:, 2].sum())(x)
    torch.testing.assert_close(ax.deeplift(f, p, x, 2, baseline=x, multiply_by_inputs=False), grad)


@settings(max_examples=30)
@given(case=st.one_of(relu_cnns(pools=("max",), batchnorm=True), resnets(activations=("relu",), pools=("max",)),
                      cnns(activations=ACTS, pools=("max",))))
def test_pooled_resolution_rules_equal_crossmax_then_rescale_on_random_networks(case):
    for b in (case.baseline, torch.zeros_like(case.x), case.x.round()):
        ours = ax.deeplift(case.model_fn, case.params, case.x, case.target, baseline=b)
        ref = unfused(ax.deeplift, case.model_fn, case.params, case.x, case.target, baseline=b)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        check_completeness(case, ours, baseline=b, rtol=1e-5, atol=1e-5)
    bl = torch.stack([case.baseline[0], torch.zeros_like(case.x[0]), case.x[0]])
    torch.testing.assert_close(
        ax.deeplift_shap(case.model_fn, case.params, case.x, case.target, bl, chunk_size=2),
        unfused(ax.deeplift_shap, case.model_fn, case.params, case.x, case.target, bl), rtol=1e-10, atol=1e-12,
    )


def test_fused_rule_composes_with_vmap_grad_and_shap_chunks():
    torch.manual_seed(13)
    m = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3),
    ).double().eval()
    assert pool_rules(m, torch.zeros(1, 1, 8, 8, dtype=D)) == ["ReluMaxPool"] * 2
    f, p = ax.functionalize(m)
    x, b = torch.randn(3, 1, 8, 8, dtype=D), torch.randn(3, 1, 8, 8, dtype=D) * 0.3
    ts = torch.tensor([[0, 1, 2], [2, 2, 1]])
    vm = torch.func.vmap(lambda t: ax.deeplift(f, p, x, t, baseline=b))(ts)
    torch.testing.assert_close(vm, torch.stack([ax.deeplift(f, p, x, t, baseline=b) for t in ts]), rtol=1e-12, atol=1e-13)
    bs = torch.randn(4, 3, 1, 8, 8, dtype=D)
    vm = torch.func.vmap(lambda bb: ax.deeplift(f, p, x, 1, baseline=bb))(bs)
    torch.testing.assert_close(vm, torch.stack([ax.deeplift(f, p, x, 1, baseline=bb) for bb in bs]), rtol=1e-12, atol=1e-13)
    bl = torch.randn(5, 1, 8, 8, dtype=D)
    mean = torch.stack([ax.deeplift(f, p, x, 1, baseline=bb.expand_as(x)) for bb in bl]).mean(0)
    for cs in (1, 3, None):
        torch.testing.assert_close(ax.deeplift_shap(f, p, x, 1, bl, chunk_size=cs), mean, rtol=1e-12, atol=1e-13)

    weights = dict(m.named_parameters())

    def loss(w):
        return (ax.deeplift(f, {**p, **w}, x, 1, baseline=b) ** 2).sum()

    assert_grad_matches_finite_differences(loss, weights)
    # plain autograd (value_and_attribution keeps history) gives the same gradient
    w = {k: v.detach().clone().requires_grad_() for k, v in weights.items()}
    _, attr = ax.value_and_attribution(ax.deeplift, f, {**p, **w}, x, 1, baseline=b)
    by_autograd = torch.autograd.grad((attr**2).sum(), list(w.values()), allow_unused=True)
    by_func = torch.func.grad(loss)(weights)
    for name, g in zip(w, by_autograd):  # None: the output bias cancels in f(x) - f(x')
        torch.testing.assert_close(torch.zeros_like(w[name]) if g is None else g, by_func[name], rtol=1e-10, atol=1e-12)


class _CausalSelfAttention(nn.Module):
    """nanoGPT-style attention written out: scores masked with ``-inf`` before the softmax (both streams
    have -inf at the same positions: ``inf - inf`` made whole rows NaN in the softmax rule)."""

    def __init__(self, d: int = 8, t: int = 5, softmax_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)
        self.register_buffer("causal", torch.tril(torch.ones(t, t)).view(1, t, t))
        self.softmax_dtype = softmax_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(x.shape[-1], dim=2)
        att = (q @ k.transpose(-2, -1)) * k.shape[-1] ** -0.5
        att = att.masked_fill(self.causal[:, : x.shape[1], : x.shape[1]] == 0, float("-inf"))
        att = F.softmax(att, dim=-1, dtype=self.softmax_dtype).to(x.dtype)
        return self.head(F.gelu(self.proj(att @ v) + x)[:, -1])


@pytest.mark.parametrize("dtype,softmax_dtype", [(torch.float64, None), (torch.float32, None),
                                                 (torch.float32, torch.float64)])
def test_deeplift_is_exact_on_attention_masked_with_minus_inf(dtype, softmax_dtype) -> None:
    torch.manual_seed(0)
    f, p = ax.functionalize(_CausalSelfAttention(softmax_dtype=softmax_dtype).to(dtype).eval())
    x, b = torch.randn(3, 5, 8, dtype=dtype), torch.randn(3, 5, 8, dtype=dtype)
    a = ax.deeplift(f, p, x, 1, baseline=b)
    assert torch.isfinite(a).all()
    gap = a.sum((1, 2)) - (f(p, x)[:, 1] - f(p, b)[:, 1])
    assert gap.abs().max() <= (1e-10 if dtype == torch.float64 else 1e-5)
    shap = ax.deeplift_shap(f, p, x, 1, torch.randn(4, 5, 8, dtype=dtype))
    assert torch.isfinite(shap).all()


class _FullyMaskedRowAttention(nn.Module):
    def __init__(self, mask: torch.Tensor, buffer: bool) -> None:
        super().__init__()
        self.qkv, self.head = nn.Linear(8, 24), nn.Linear(8, 2)
        if buffer:  # an input of the program (a parameter-like value): zeroed by nodes of the program
            self.register_buffer("mask", mask)
        else:  # a constant of the program: zeroed where its values have such a row
            self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).split(8, -1)
        return self.head(F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask).squeeze(1).sum(1))


@pytest.mark.parametrize("mask,buffer", [
    (torch.tensor([[True, True, False], [False] * 3, [True, False, False]]), False),
    (torch.tensor([[True, True, False], [False] * 3, [True, False, False]]), True),
    (torch.tensor([[0.0, 0.0, -float("inf")], [-float("inf")] * 3, [0.0, -float("inf"), -float("inf")]]), False),
], ids=["bool", "bool-buffer", "additive"])
def test_deeplift_on_attention_with_a_fully_masked_query_row(mask, buffer) -> None:
    # the kernel gives 0 for a query row whose keys are all masked; the written-out attention gave the uniform
    # average (0.49 of completeness lost, silently)
    torch.manual_seed(0)
    net = _FullyMaskedRowAttention(mask.double() if mask.is_floating_point() else mask, buffer).double().eval()
    f, p = ax.functionalize(net)
    x, b = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    a = ax.deeplift(f, p, x, 1, baseline=b)
    assert (a.sum((1, 2)) - (f(p, x)[:, 1] - f(p, b)[:, 1])).abs().max() < 1e-10


class _CastScores(nn.Module):
    """Attention scores in float32 inside a float64 model, plus a float64 mask (GPT-J casts its q/k this way and
    adds its causal mask in the model's dtype: the sum, softmax and cotangent are float64)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.o = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        s = self.q(x).float() @ self.k(x).float().transpose(-1, -2)
        s = s + torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype).triu(1) * -1e4
        return self.o(s.softmax(-1).to(x.dtype) @ x).sum(1)


def test_a_product_computed_in_another_dtype_than_the_model():
    # the cotangent came in float64 to a float32 matmul: "expected scalar type Double but found Float"
    model = _CastScores().double().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    attr = ax.deeplift(f, p, x, 1)
    assert attr.dtype == torch.float64
    delta = (f(p, x) - f(p, torch.zeros_like(x)))[:, 1]
    torch.testing.assert_close(attr.sum((1, 2)), delta, rtol=1e-5, atol=1e-6)
