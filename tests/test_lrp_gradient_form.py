"""LRP in gradient form and attention kept fused (``ax.lrp(form=...)``, ``relevance.Attention``).

The relevance form divides the relevance by a stabilised output at every rule; the gradient form
carries a modified gradient ``g`` (relevance = value x g at every node) and multiplies by the input
once. The two are the same numbers to rounding for every rule that has a gradient form: checked
here on CNNs (the epsilon composites), on HF transformers (AttnLRP, CP-LRP, the default), and for
the fused attention rule against the decomposed attention at epsilon = 0.
"""

import pytest
import torch
from torch import nn

import attrax as ax
from conftest import assert_grad_matches_finite_differences

D = torch.float64


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 8, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.to(D).eval(), torch.randn(3, 3, 8, 8, dtype=D)


@pytest.mark.parametrize("composite", [None, "epsilon", "attn_lrp", "cp_lrp"])
def test_cnn_gradient_form_equals_relevance_form(composite):
    net, x = cnn()
    f, p = ax.functionalize(net)
    comp = {None: None, "epsilon": ax.composites.mapping(by_type={ax.composites.Kind("layer"): ax.rules.Epsilon(1e-3)}),
            "attn_lrp": ax.composites.attn_lrp(1e-4), "cp_lrp": ax.composites.cp_lrp()}[composite]
    a = ax.lrp(f, p, x, 2, composite=comp, form="relevance")
    b = ax.lrp(f, p, x, 2, composite=comp, form="gradient")
    assert rel_err(b, a) < 1e-10
    torch.testing.assert_close(ax.lrp(f, p, x, 2, composite=comp), b)  # "auto" takes the gradient form


def test_rules_without_gradient_form_fall_back_or_refuse():
    net, x = cnn()
    f, p = ax.functionalize(net)
    comp = ax.composites.epsilon_plus_flat()
    a = ax.lrp(f, p, x, 1, composite=comp)
    torch.testing.assert_close(a, ax.lrp(f, p, x, 1, composite=comp, form="relevance"))
    with pytest.raises(ValueError, match="no gradient form"):
        ax.lrp(f, p, x, 1, composite=comp, form="gradient")
    with pytest.raises(ValueError, match="form must be"):
        ax.lrp(f, p, x, 1, form="fast")


transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402


def lm(kind, layers=2, dtype=D):
    torch.manual_seed(0)
    if kind == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=13, n_positions=16))
        emb = "transformer.wte"
    else:
        m = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, hidden_size=16, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=24, vocab_size=13,
                                         max_position_embeddings=16))
        emb = "model.embed_tokens"
    m = m.to(dtype).eval()
    f, p = ax.functionalize(m, output=lambda o: o.logits[:, -1], embedding=emb)
    ids = torch.randint(0, 13, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m, f, p, f.embed(p, ids)


def _has_fused_attention(f, p, x):
    from attrax.lrp import _prepare_form
    from attrax.rewrite import program_spec

    spec, batch = program_spec(f, p, (x,))
    program, _, drop = _prepare_form(f, spec, batch, ax.composites.attn_lrp(), True, "auto")
    return drop is not None and any(n.packet == "scaled_dot_product_attention" for n in program.nodes)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("which", ["attn_lrp", "cp_lrp"])
def test_fused_attention_equals_decomposed_at_epsilon_zero(kind, which):
    _, f, p, x = lm(kind)
    assert _has_fused_attention(f, p, x)
    comp = getattr(ax.composites, which)(epsilon=0.0)
    fused = ax.lrp(f, p, x, 3, composite=comp)
    decomposed = ax.lrp(f, p, x, 3, composite=comp, form="relevance")
    # the relevance form divides by outputs stabilised with 1e-12 where epsilon = 0 (and Llama's RMSNorm
    # computes in float32 inside a float64 model): differences of that order at small outputs
    assert rel_err(fused, decomposed) < 1e-6


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_default_epsilon_fused_is_close_to_decomposed(kind):
    """epsilon = 1e-6: the fused rule stabilises at the attention output only (not at the scores)."""
    _, f, p, x = lm(kind)
    comp = ax.composites.attn_lrp()
    assert rel_err(ax.lrp(f, p, x, 3, composite=comp), ax.lrp(f, p, x, 3, composite=comp, form="relevance")) < 1e-4


def test_fused_attention_in_float32_equals_float64():
    _, f, p, x = lm("gpt2")
    _, f32, p32, x32 = lm("gpt2", dtype=torch.float32)
    comp = ax.composites.attn_lrp()
    assert rel_err(ax.lrp(f32, p32, x32, 3, composite=comp).double(), ax.lrp(f, p, x, 3, composite=comp)) < 1e-4


@pytest.mark.parametrize("which", ["attn_lrp", "cp_lrp"])
def test_grad_wrt_params_through_fused_attention(which):
    """The fused kernels have no double backward: differentiated, the rule uses the written-out attention."""
    m, f, p, x = lm("gpt2", layers=1)
    names = ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.mlp.c_fc.bias")
    weights = {k: p[k] for k in names}
    comp = getattr(ax.composites, which)()

    def loss(w):
        return (ax.lrp(f, {**p, **w}, x, 2, composite=comp) ** 2).sum()

    assert_grad_matches_finite_differences(loss, weights, per_tensor=2, rtol=1e-4)


def test_vmap_compile_and_export_with_fused_attention(tmp_path):
    _, f, p, x = lm("gpt2", dtype=torch.float32)
    comp = ax.composites.attn_lrp()
    ts = torch.tensor([[0, 1], [4, 2], [3, 3]])
    vm = torch.func.vmap(lambda t: ax.lrp(f, p, x, t, composite=comp))(ts)
    torch.testing.assert_close(vm, torch.stack([ax.lrp(f, p, x, t, composite=comp) for t in ts]))
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: ax.lrp(f, p, x, t, composite=comp), backend="aot_eager", fullgraph=True)
    t = torch.tensor([1, 2])
    torch.testing.assert_close(fn(x, t), ax.lrp(f, p, x, t, composite=comp))


# ------------------------------------------------- review findings: wrong numbers the fused rule must not give


class CrossAttention(nn.Module):
    """Queries from x; keys/values from a learned memory (constant for the attribution), or k/v from x and
    learned queries (Perceiver-style), or an attention bias computed from x."""

    def __init__(self, mode, d=8, heads=2):
        super().__init__()
        self.mode, self.heads = mode, heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.memory = nn.Parameter(torch.randn(3, d))
        self.bias = nn.Linear(d, 5)
        self.head = nn.Linear(d, 3)

    def split(self, t):
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x):
        b = x.shape[0]
        mem = self.memory.expand(b, -1, -1)
        mask = None
        if self.mode == "memory":  # k, v constant
            q, k, v = self.q(x), self.k(mem), self.v(mem)
        elif self.mode == "perceiver":  # q constant
            q, k, v = self.q(mem), self.k(x), self.v(x)
        else:  # an input-dependent additive mask
            q, k, v = self.q(x), self.k(x), self.v(x)
            mask = self.bias(x).unsqueeze(1)
        a = torch.nn.functional.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v), attn_mask=mask)
        return self.head(self.o(a.transpose(1, 2).flatten(2)).mean(1))


@pytest.mark.parametrize("mode", ["memory", "perceiver", "mask"])
@pytest.mark.parametrize("which", ["attn_lrp", "cp_lrp"])
def test_fused_attention_follows_which_operands_depend_on_the_input(mode, which):
    """Where only some of q, k, v depend on x the written-out graph's products are linear (all relevance to
    the dependent operand); an input-dependent mask makes the program keep the attention written out."""
    torch.manual_seed(0)
    net = CrossAttention(mode).to(D).eval()
    f, p = ax.functionalize(net)
    x = torch.randn(2, 5, 8, dtype=D)
    comp = getattr(ax.composites, which)(epsilon=0.0)
    assert rel_err(ax.lrp(f, p, x, 1, composite=comp), ax.lrp(f, p, x, 1, composite=comp, form="relevance")) < 1e-8


def test_identity_rule_at_an_exact_zero_sends_nothing_and_no_nan():
    """A sigmoid whose input is exactly 0 (all ReLUs dead): f(0)/0 must not overflow into a NaN."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.Sigmoid(), nn.Linear(5, 3))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)
        net[4].weight.mul_(50.0)
    for dtype in (torch.float32, torch.float64):
        f, p = ax.functionalize(net.to(dtype))
        x = torch.rand(3, 4, dtype=dtype)
        for comp in (None, ax.composites.attn_lrp()):
            r = ax.lrp(f, p, x, 0, composite=comp)
            assert torch.isfinite(r).all()
            torch.testing.assert_close(r, ax.lrp(f, p, x, 0, composite=comp, form="relevance"))


def test_dropout_in_training_keeps_the_attention_written_out():
    m, f, p, x = lm("gpt2", layers=1)
    m.train()
    m.config.attn_pdrop = 0.5
    for mod in m.modules():
        if hasattr(mod, "attn_dropout"):
            mod.attn_dropout.p = 0.5
    with pytest.warns(UserWarning):
        ax.lrp(f, p, x, 1, composite=ax.composites.attn_lrp())
