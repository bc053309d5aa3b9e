"""DeepLift's fast paths on transformers (issue 16.5): explicit transposes for casts, constant masks and
splits, closed-form secants, analytic derivative fallbacks, attention softmax from the streams' own
outputs, and midpoint transposes for products. Each equals the general form it replaces (the op's own
vjp, the secant, the log-softmax pass) to rounding, keeps summation-to-delta, and stays an ordinary
differentiable computation (second order against finite differences in float64).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attrax as ax
from attrax.rewrite import program_for
from conftest import assert_grad_matches_finite_differences

D = torch.float64


class CausalBlock(nn.Module):
    """RMSNorm (float32 cast and back, pow/mean/rsqrt), causal attention through SDPA (masked_fill,
    softmax, two products of activations), a fused q/k/v projection split in three, a SiLU-gated MLP and
    a GELU-tanh-style cube; the last position's logits."""

    def __init__(self, d: int = 8, heads: int = 2, dtype: torch.dtype = D) -> None:
        super().__init__()
        self.h = heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm_w = nn.Parameter(torch.rand(d) + 0.5)
        self.head = nn.Linear(d, 3)
        self.to(dtype)

    def norm(self, x):
        h = x.to(torch.float64)  # HF's RMSNorm casts up and back (a real cast for float32 models)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.norm_w * h.to(x.dtype)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).split(d, dim=-1)
        q, k, v = (u.view(b, t, self.h, d // self.h).transpose(1, 2) for u in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.norm(x)
        g = self.gate(h)
        g = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g.pow(3))))
        x = x + self.down(nn.functional.silu(self.up(h)) * g)
        return self.head(x[:, -1])


def _targets(program):
    return {n.target for n in program.nodes if n.op == "call"}


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (D, 1e-10)])
def test_causal_block_is_exact(dtype, rtol):
    torch.manual_seed(0)
    m = CausalBlock(dtype=dtype).eval()
    f, p = ax.functionalize(m)
    x, b = torch.randn(3, 6, 8, dtype=dtype), torch.randn(3, 6, 8, dtype=dtype) * 0.3
    targets = _targets(program_for(f, p, (x,)))
    if dtype == torch.float32:
        assert "aten._to_copy.default" in targets or "aten.to.dtype" in targets
    for op in ("aten.masked_fill.Scalar", "aten.split.Tensor", "aten.softmax.int", "aten.pow.Tensor_Scalar",
               "aten.rsqrt.default", "aten.silu.default", "aten.tanh.default", "aten.matmul.default"):
        assert op in targets, op  # the model exercises every fast path
    for t in range(3):
        a, delta = ax.deeplift(f, p, x, t, baseline=b, return_convergence_delta=True)
        with torch.no_grad():
            span = (f(p, x)[:, t] - f(p, b)[:, t]).abs() + a.flatten(1).abs().sum(1)
        assert (delta.abs() / span).max() <= rtol, t


def test_causal_block_second_order_matches_finite_differences():
    torch.manual_seed(1)
    m = CausalBlock().eval()
    f, p = ax.functionalize(m)
    x, b = torch.randn(2, 5, 8, dtype=D), torch.randn(2, 5, 8, dtype=D) * 0.3
    weights = {k: v for k, v in dict(m.named_parameters()).items() if k in ("qkv.weight", "up.weight", "norm_w")}
    assert_grad_matches_finite_differences(lambda w: (ax.deeplift(f, {**p, **w}, x, 1, baseline=b) ** 2).sum(),
                                           weights)


def test_gradient_transposes_equal_autograd():
    # guided backprop is the exact gradient on a model without ReLU: every Gradient node (the casts, the
    # constant mask, the split, the products) goes through the explicit transposes
    for dtype, tol in ((D, 1e-10), (torch.float32, 1e-5)):
        torch.manual_seed(2)
        m = CausalBlock(dtype=dtype).eval()
        f, p = ax.functionalize(m)
        x = torch.randn(2, 5, 8, dtype=dtype)
        got = ax.guided_backprop(f, p, x, 2)
        want = torch.func.grad(lambda xx: f(p, xx)[:, 2].sum())(x)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("fn", [lambda t: t.pow(2), lambda t: t.pow(3), torch.square, lambda t: torch.rsqrt(t + 2),
                                lambda t: torch.sqrt(t + 2), lambda t: torch.reciprocal(t + 2)])
@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_closed_form_secants(fn, dtype):
    class M(nn.Module):
        def forward(self, x):
            return fn(x).sum(-1, keepdim=True)

    f, p = ax.functionalize(M())
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 5, generator=gen, dtype=dtype) * 1.5
    b = torch.cat([x[:16], x[16:32] + 1e-7, torch.rand(32, 5, generator=gen, dtype=dtype)])  # equal, close, far
    m = ax.deeplift(f, p, x, 0, baseline=b, multiply_by_inputs=False)
    with torch.no_grad():
        dy, dx = fn(x.double()) - fn(b.double()), x.double() - b.double()  # the secant, without float32 cancellation
        deriv = torch.func.vmap(torch.func.grad(lambda t: fn(t).sum()))(x)
    far = dx.abs() > 1e-3
    torch.testing.assert_close(m.double()[far], (dy / dx)[far], rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
    torch.testing.assert_close(m[:16], deriv[:16], rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    a = ax.deeplift(f, p, x, 0, baseline=b)
    with torch.no_grad():
        want = (f(p, x) - f(p, b))[:, 0]
    # against the streams' own outputs (up to ~17 here): to their rounding
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(a.sum(1), want, rtol=0, atol=float(64 * eps * (fn(x).abs() + fn(b).abs()).sum(1).max()))


@pytest.mark.parametrize("act", [nn.SiLU(), nn.Tanh(), nn.Sigmoid()])
def test_analytic_derivative_fallback(act):
    # where the input did not move the multiplier is f'(x), now from the output in closed form
    f, p = ax.functionalize(nn.Sequential(act))
    x = torch.linspace(-4, 4, 17, dtype=D)[None]
    m = ax.deeplift(f, p, x, "sum", baseline=x.clone(), multiply_by_inputs=False)
    want = torch.func.vmap(torch.func.grad(lambda t: act(t).sum()))(x[0])[None]
    torch.testing.assert_close(m, want, rtol=1e-12, atol=0)


def test_attention_softmax_matches_the_log_softmax_form():
    # the softmax rule reads log-softmax and log-sum-exp off the streams' own softmax; against the same
    # rule fed by a log-softmax pass (float16 path off), on masked causal scores
    from attrax.rewrite import Site, Streams
    from attrax.rules import SoftmaxRescale

    torch.manual_seed(4)
    scores = torch.randn(2, 3, 7, 7, dtype=D) * 4
    mask = torch.ones(7, 7, dtype=torch.bool).tril().logical_not()
    x = scores.masked_fill(mask, torch.finfo(D).min)
    r = (scores * 0.3 + 0.5).masked_fill(mask, torch.finfo(D).min)

    class S(nn.Module):
        def forward(self, s):
            return torch.softmax(s, -1)

    f, p = ax.functionalize(S())
    prog = program_for(f, p, (x,))
    node = next(n for n in prog.nodes if n.op == "call" and n.packet == "softmax")
    env_x, env_r = [None] * len(prog.nodes), [None] * len(prog.nodes)
    env_x[node.args[0][1]], env_r[node.args[0][1]] = x, r
    env_x[node.index], env_r[node.index] = torch.softmax(x, -1), torch.softmax(r, -1)
    g = torch.randn_like(x)
    got = SoftmaxRescale().backward(Site(node, Streams(prog, env_x, env_r, 2)), g)[node.args[0][1]]
    # reference: the chain rule of the rescale multipliers written out with log_softmax and logsumexp
    z, zr = torch.log_softmax(x, -1), torch.log_softmax(r, -1)
    dl = torch.logsumexp(x, -1, keepdim=True) - torch.logsumexp(r, -1, keepdim=True)
    dx = x - r
    secant_exp = lambda a, b: torch.where(a == b, torch.exp(a), (torch.exp(a) - torch.exp(b)) / (a - b))  # noqa: E731
    big = torch.logsumexp(x, -1, keepdim=True)
    # (e^x - e^x')/dx over (e^L - e^L')/dL, both divided by e^L
    mu = secant_exp(x - big, r - big) / secant_exp(torch.zeros_like(dl), -dl)
    h = g * secant_exp(z, zr)
    want = h - mu * h.sum(-1, keepdim=True)
    keep = ~mask.expand_as(x)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-8, atol=1e-10)
    assert torch.isfinite(got).all()
