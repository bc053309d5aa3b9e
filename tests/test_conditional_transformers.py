"""Conditional attribution (CRP) on transformers: MLP neurons and attention heads (issue 16.3)."""

from __future__ import annotations

import pytest
import torch

import attrax as ax

transformers = pytest.importorskip("transformers")
D = torch.float64


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=30, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    f, p = ax.functionalize(model, output=lambda out: out.logits[:, -1], embedding="transformer.wte")
    e = f.embed(p, torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(1)))
    return f, p, e


def test_mlp_neurons_are_the_last_dim_and_partitions_add_up(gpt2) -> None:
    f, p, e = gpt2
    layer = "transformer.h.1.mlp.c_fc"  # GPT-2's Conv1D: (B, T, 64)
    parts = [{layer: list(range(c, c + 16))} for c in range(0, 64, 16)]
    heat = ax.conditional(f, p, e, 3, parts)
    whole = ax.conditional(f, p, e, 3, [{layer: list(range(64))}])
    torch.testing.assert_close(heat.sum(0), whole[0], rtol=1e-9, atol=1e-12)
    # every neuron kept and nothing cut: plain LRP
    kept = ax.conditional(f, p, e, 3, [{layer: list(range(64))}], exclude_parallel=False)
    torch.testing.assert_close(kept[0], ax.lrp(f, p, e, 3), rtol=1e-9, atol=1e-12)
    rel = ax.concepts.relevances(f, p, e, 3, layer)
    assert rel.shape == (2, 64)
    with pytest.raises(ValueError, match=r"channels \[64\] outside \[0, 64\)"):
        ax.conditional(f, p, e, 3, [{layer: [64]}])


def test_exclude_parallel_cuts_the_residual_stream(gpt2) -> None:
    f, p, e = gpt2
    layer = "transformer.h.1.mlp.c_fc"
    through_mlp = ax.conditional(f, p, e, 3, [{layer: list(range(64))}], exclude_parallel=True)[0]
    full = ax.lrp(f, p, e, 3)
    assert not torch.allclose(through_mlp, full)  # the residual around the MLP carries relevance too
    # a neuron's relevance is what arrives at it; with the residual cut, the other neurons get none
    rel = ax.concepts.relevances(f, p, e, 3, layer, condition={layer: [5]})
    assert rel[:, 5].abs().sum() > 0 and torch.equal(rel[:, :5], torch.zeros_like(rel[:, :5]))


def test_attention_heads(gpt2) -> None:
    f, p, e = gpt2
    layer = "transformer.h.0.attn:heads"
    per_head = ax.conditional(f, p, e, 3, [{layer: [h]} for h in range(4)])
    all_heads = ax.conditional(f, p, e, 3, [{layer: [0, 1, 2, 3]}])
    torch.testing.assert_close(per_head.sum(0), all_heads[0], rtol=1e-9, atol=1e-12)
    assert ax.concepts.relevances(f, p, e, 3, layer).shape == (2, 4)
    with pytest.raises(ValueError, match="no attention"):
        ax.conditional(f, p, e, 3, [{"transformer.h.0.mlp:heads": [0]}])
