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
