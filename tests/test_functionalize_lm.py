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


# --------------------------------------------------------------------------- models that read the ids again


def _roberta() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=24,
                                     vocab_size=30, max_position_embeddings=24, pad_token_id=1)
    return transformers.RobertaForMaskedLM(cfg).double().eval()


def _llama_classifier(pad: int) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=24, vocab_size=30, max_position_embeddings=16, num_labels=3,
                                   pad_token_id=pad)
    return transformers.LlamaForSequenceClassification(cfg).double().eval()


@pytest.mark.parametrize("case", ["roberta", "classifier_pad0", "classifier_pad0_right"])
def test_models_that_read_the_ids_for_padding_get_the_padding(case: str) -> None:
    # model_fn used to call the module with zeros as ids: RoBERTa computes position ids from the ids' padding (a
    # left-padded row was 1.08 off the module), a sequence classification head pools the last non-pad token (with
    # pad id 0 every row pooled position 0). The ids are now a non-pad token, and the pad where the mask is 0
    model = _roberta() if case == "roberta" else _llama_classifier(0)
    layer = "roberta.embeddings.word_embeddings" if case == "roberta" else "model.embed_tokens"
    pad = model.config.pad_token_id
    f, p = ax.functionalize(model, output="logits", embedding=layer)
    ids = torch.randint(3, 30, (2, 7), generator=torch.Generator().manual_seed(1))
    left = case != "classifier_pad0_right"
    if left:
        ids[0, :3] = pad
    else:
        ids[0, -3:] = pad
    mask = (ids != pad).long()
    e = f.embed(p, ids)
    with torch.no_grad():
        torch.testing.assert_close(f(p, e, mask), model(ids, attention_mask=mask).logits, rtol=1e-10, atol=1e-12)
    target = (6, 4) if case == "roberta" else 1
    kept = slice(3, 7) if left else slice(0, 4)
    for method in (ax.input_x_gradient, ax.deeplift):
        batch = method(f, p, e, target, additional_forward_args={"attention_mask": mask})
        alone = method(f, p, e[:1, kept], (3, 4) if case == "roberta" else 1,
                       additional_forward_args={"attention_mask": mask[:1, kept]})
        torch.testing.assert_close(batch[:1, kept], alone, rtol=1e-6, atol=1e-9)


def test_a_model_that_reads_the_ids_themselves_is_refused() -> None:
    # CLIP's text model pools at the position of the largest id (its eos): no ids model_fn can make up are right
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=16, eos_token_id=2, pad_token_id=1)
    model = transformers.CLIPTextModel(cfg).eval()
    f, p = ax.functionalize(model, output="pooler_output", embedding="text_model.embeddings.token_embedding")
    ids = torch.randint(5, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    e = f.embed(p, ids)
    for method in (ax.input_x_gradient, ax.lrp):
        with pytest.raises(ValueError, match="reads the token ids again past that layer.*ax.layer.integrated_gradients"):
            method(f, p, e, 3)
    g, q = ax.functionalize(model, output="pooler_output")  # the way out the message gives: the ids, a layer method
    assert ax.layer.integrated_gradients(g, q, ids, 3, layer="text_model.embeddings.token_embedding").shape == (2, 6, 16)


def test_a_hook_on_the_embedding_layer_runs_once() -> None:
    # embed() runs the layer's hooks; model_fn's injected output went through them a second time (0.17 off)
    model = gpt2()
    handle = model.transformer.wte.register_forward_hook(lambda mod, args, out: out * 2.0)
    try:
        f, p = ax.functionalize(model, output="logits", embedding="transformer.wte")
        ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(1))
        e = f.embed(p, ids)
        with torch.no_grad():
            torch.testing.assert_close(f(p, e), model(ids).logits)
        xx = e.detach().requires_grad_()
        (g,) = torch.autograd.grad(model(inputs_embeds=xx).logits[:, -1, 3].sum(), xx)
        torch.testing.assert_close(ax.input_x_gradient(f, p, e, (5, 3)), g * e)
        # compiled calls run the user's module, hooks and all: refused before compiling, in plain words
        with pytest.raises(ValueError, match="has forward hooks"):
            ax.compile(ax.input_x_gradient, f, p)(e, 3)
    finally:
        handle.remove()


@pytest.mark.parametrize("mask_dims", [2, 4])
def test_a_classifier_whose_pad_is_its_eos_needs_the_real_ids(mask_dims: int) -> None:
    # pad = eos (how LM classifiers are often set up): an eos inside the text is a pad to the head's pooling, which
    # made-up ids cannot show (0.15 off) -- refused, and exact with the real ids bound as input_ids. A 4-D mask
    # marks the pads of the made-up ids as a 2-D one does
    model = _llama_classifier(2)
    f, p = ax.functionalize(model, output="logits", embedding="model.embed_tokens")
    ids = torch.randint(3, 30, (2, 7), generator=torch.Generator().manual_seed(1))
    ids[0, 4] = 2  # an eos inside the text
    ids[1, -2:] = 2  # right padding
    mask2 = torch.ones_like(ids)
    mask2[1, -2:] = 0
    mask = mask2
    if mask_dims == 4:
        seen = mask2[:, None, None, :].bool() & torch.ones(7, 7, dtype=torch.bool).tril()
        mask = torch.zeros(2, 1, 7, 7, dtype=D).masked_fill(~seen, torch.finfo(D).min)
    e = f.embed(p, ids)
    with pytest.raises(ValueError, match="reads the token ids again.*input_ids"):
        ax.input_x_gradient(f, p, e, 1, additional_forward_args={"attention_mask": mask})
    # the head by hand: the model on inputs_embeds, pooled where HF pools for these ids
    xx = e.detach().requires_grad_()
    hidden = model.model(inputs_embeds=xx, attention_mask=mask2).last_hidden_state
    last = (torch.arange(7) * (ids != 2)).argmax(-1)
    logits = model.score(hidden)[torch.arange(2), last]
    torch.testing.assert_close(logits, model(ids, attention_mask=mask2).logits)
    (g,) = torch.autograd.grad(logits[:, 1].sum(), xx)
    args = {"attention_mask": mask, "input_ids": ids}
    torch.testing.assert_close(ax.input_x_gradient(f, p, e, 1, additional_forward_args=args), g * e)
    alone = ax.deeplift(f, p, e[1:, :5], 1, additional_forward_args={"attention_mask": mask2[1:, :5],
                                                                     "input_ids": ids[1:, :5]})
    batch = ax.deeplift(f, p, e, 1, additional_forward_args=args)
    torch.testing.assert_close(batch[1:, :5], alone, rtol=1e-6, atol=1e-9)
    assert batch[1, 5:].abs().max() == 0


def test_ids_facts_follow_the_config_and_accept_lists_of_eos_ids() -> None:
    # Llama 3 configs hold a list of eos ids (the set of special ids failed: "unhashable type: 'list'"); a pad among
    # them is a real token to the pooling (refused without the real ids); a pad changed after the first calls counts
    model = _llama_classifier(0)
    model.config.eos_token_id = [2, 5]
    f, p = ax.functionalize(model, output="logits", embedding="model.embed_tokens")
    ids = torch.randint(6, 30, (2, 7), generator=torch.Generator().manual_seed(1))
    ids[1, -2:] = 0
    mask = (ids != 0).long()
    e = f.embed(p, ids)
    ax.input_x_gradient(f, p, e, 1, additional_forward_args={"attention_mask": mask})
    with torch.no_grad():
        torch.testing.assert_close(f(p, e, mask), model(ids, attention_mask=mask).logits)
    model.config.pad_token_id = 5  # now one of the eos ids: the pooling reads eos as padding
    ids[1, -2:] = 5
    with pytest.raises(ValueError, match="reads the token ids again"):
        ax.input_x_gradient(f, p, e, 1, additional_forward_args={"attention_mask": mask})
    with torch.no_grad():
        torch.testing.assert_close(f(p, e, mask), model(ids, attention_mask=mask).logits)  # the new pad, placed


@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated")  # (dynamo on HF)
def test_an_embedding_shared_by_encoder_and_decoder_is_refused() -> None:
    # T5's encoder and decoder call one shared embedding: the decoder was handed the encoder's input (6.46 off)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=30, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).double().eval()
    f, p = ax.functionalize(model, output="logits", embedding="encoder.embed_tokens")
    ids = torch.randint(1, 30, (2, 5), generator=torch.Generator().manual_seed(1))
    e = f.embed(p, ids)
    with pytest.raises(ValueError, match="called more than once in one forward"):
        f(p, e, None, ids)  # (input_ids, attention_mask, decoder_input_ids=ids)
    # compiled, the user's module runs with the layer answering inside the graph: refused there too (it was not)
    explain = ax.compile(ax.input_x_gradient, f, p, backend="eager", additional_forward_args={"decoder_input_ids": ids})
    with pytest.raises(ValueError, match="called more than once in one forward"):
        explain(e.detach(), (4, 3))


def test_an_embedding_layer_the_forward_never_calls_is_refused() -> None:
    # BART's model.shared is only tied to the encoder's and decoder's own layers: x never reached the output and every
    # attribution was exactly 0 (with the ids bound); the layer the forward calls works
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=30, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                                  max_position_embeddings=16)
    model = transformers.BartModel(cfg).double().eval()
    ids = torch.randint(3, 30, (2, 5), generator=torch.Generator().manual_seed(1))
    f, p = ax.functionalize(model, output="last_hidden_state", embedding="shared")
    e = f.embed(p, ids)
    if model.shared is not model.encoder.embed_tokens:
        with pytest.raises(ValueError, match="never called that layer"):
            ax.input_x_gradient(f, p, e, (4, 3), additional_forward_args={"input_ids": ids, "decoder_input_ids": ids})
    g, q = ax.functionalize(model.encoder, output="last_hidden_state", embedding="embed_tokens")
    with torch.no_grad():
        torch.testing.assert_close(g(q, g.embed(q, ids)), model.encoder(ids).last_hidden_state)


@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated")  # (dynamo on HF)
def test_compiled_explainer_with_the_real_ids_bound() -> None:
    model = _llama_classifier(2)  # pad = eos: refused without the ids
    f, p = ax.functionalize(model, output="logits", embedding="model.embed_tokens")
    ids = torch.randint(3, 30, (2, 7), generator=torch.Generator().manual_seed(1))
    ids[0, 4] = 2
    args = {"attention_mask": torch.ones_like(ids), "input_ids": ids}
    e = f.embed(p, ids).detach()
    explain = ax.compile(ax.input_x_gradient, f, p, backend="eager", additional_forward_args=args)
    torch.testing.assert_close(explain(e, torch.tensor([1, 1])),
                               ax.input_x_gradient(f, p, e, 1, additional_forward_args=args))


def test_token_ids_given_to_an_embedding_model_are_named() -> None:
    # a span/perturbation method given ids on an embedding= model failed inside HF ("size of tensor a (7) must match")
    f, p = ax.functionalize(gpt2(), output="logits", embedding="transformer.wte")
    ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(TypeError, match=r"takes that layer's output \(B, T, D\).*model_fn.embed"):
        f(p, ids)
