"""``functionalize(module, output=..., embedding=...)`` on language models (API §9, issue 17.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attrax as ax
from conftest import assert_unchanged, module_snapshot

transformers = pytest.importorskip("transformers")
D = torch.float64


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=30, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).double().eval()  # lm_head is tied to transformer.wte


def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=24, vocab_size=30, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=24,
                                  vocab_size=30, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).double().eval()


MODELS = {"gpt2": (gpt2, "transformer.wte"), "llama": (llama, "model.embed_tokens"),
          "bert": (bert, "bert.embeddings.word_embeddings")}


class ByHand(nn.Module):
    """The wrapper users wrote before: the model on inputs_embeds, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=e).logits


@pytest.mark.parametrize("name", list(MODELS))
def test_model_fn_on_embeddings_equals_the_module_on_ids(name: str) -> None:
    make, layer = MODELS[name]
    model = make()
    before = module_snapshot(model)
    f, p = ax.functionalize(model, output="logits", embedding=layer)
    ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(1))
    e = f.embed(p, ids)
    assert e.shape == (2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(f(p, e), model(ids).logits)
    assert_unchanged(model, before)


def _target(name: str) -> object:
    return (5, 7) if name != "bert" else 1  # LMs: token 7 at the last position; BERT: class 1


@pytest.mark.parametrize("method", ["integrated_gradients", "input_x_gradient", "deeplift", "occlusion",
                                    "feature_ablation"])
@pytest.mark.parametrize("name", list(MODELS))
def test_methods_from_token_ids_equal_the_hand_wrapped_model(name: str, method: str) -> None:
    make, layer = MODELS[name]
    model = make()
    f, p = ax.functionalize(model, output="logits", embedding=layer)
    hand_f, hand_p = ax.functionalize(ByHand(model))
    ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(2))
    e = f.embed(p, ids)
    kw = {
        "integrated_gradients": {"n_steps": 8},
        "occlusion": {"window": (2, 16), "stride": (1, 16)},
        "feature_ablation": {"feature_mask": torch.arange(6).view(1, 6, 1).expand(2, 6, 16)},
    }.get(method, {})
    call = getattr(ax, method)
    got = call(f, p, e, _target(name), **kw)
    want = call(hand_f, hand_p, e, _target(name), **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    if method == "deeplift":
        gap = ax.metrics.completeness_delta(f, p, e, _target(name), got)
        assert gap.abs().max() < (1e-5 if name == "llama" else 1e-8)  # Llama's RMSNorm runs in float32


def test_output_selection_forms_and_errors() -> None:
    model = gpt2()
    ids = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        want = model(ids).logits
    for output in ("logits", 0, lambda out: out.logits):
        f, p = ax.functionalize(model, output=output)
        with torch.no_grad():
            torch.testing.assert_close(f(p, ids), want)
    f, p = ax.functionalize(model, output="nope")
    with pytest.raises(ValueError, match="output='nope' is not in the model's result"):
        f(p, ids)
    with pytest.raises(ValueError, match="embedding='transformer.nope' is not a submodule.*transformer.wte"):
        ax.functionalize(model, embedding="transformer.nope")
    with pytest.raises(TypeError, match="output must be"):
        ax.functionalize(model, output=1.5)
    f, p = ax.functionalize(model)
    with pytest.raises(ValueError, match="embed needs functionalize"):
        f.embed(p, ids)


def test_gradients_reach_the_tied_embedding_weight() -> None:
    model = gpt2()
    f, p = ax.functionalize(model, output="logits", embedding="transformer.wte")
    ids = torch.randint(0, 30, (1, 4))
    e = f.embed(p, ids).detach()
    weights = {k: v for k, v in p.items() if k == "transformer.wte.weight"}

    def loss(w):
        return f({**p, **w}, e)[:, -1, 3].sum()  # only lm_head (tied to wte) sees the weight here

    g = torch.func.grad(loss)(weights)["transformer.wte.weight"]
    assert g.abs().sum() > 0
