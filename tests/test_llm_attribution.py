"""ax.text span perturbation equals Captum's LLMAttribution (issue 17.5)."""

from __future__ import annotations

import pytest
import torch

import attrax as ax

transformers = pytest.importorskip("transformers")
captum_attr = pytest.importorskip("captum.attr")

WORDS = [f"w{i}" for i in range(50)]  # "wi" is token id i


class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary: the methods LLMAttribution calls."""

    def __init__(self) -> None:
        self.vocab = {w: i for i, w in enumerate(WORDS)}

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.get(w, 0) for w in text.split()]

    def encode(self, text, return_tensors=None, add_special_tokens=True):
        ids = self._ids(text)
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        ids = [ids] if isinstance(ids, int) else ids
        return " ".join(WORDS[i] for i in ids)

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True, **kw):
        ids, offsets, pos = [], [], 0
        for w in text.split():
            s = text.index(w, pos)
            ids.append(self.vocab.get(w, 0))
            offsets.append((s, s + len(w)))
            pos = s + len(w)
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def convert_ids_to_tokens(self, ids):
        return [WORDS[i] for i in ids]

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab[t] for t in tokens]


def ids(text: str) -> torch.Tensor:
    return torch.tensor(WordTokenizer()._ids(text))


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model_fn, params = ax.functionalize(model, output="logits")
    return model, model_fn, params


def captum_llm(model, method):
    return captum_attr.LLMAttribution(method(model), WordTokenizer())


PROMPT = "w1 w2 w3 w4 w5 w6"
TARGET = "w7 w8 w9"


@pytest.mark.parametrize("in_tokens", [False, True])
def test_template_feature_ablation(lm, in_tokens):
    model, model_fn, params = lm
    inp = captum_attr.TextTemplateInput("{} w3 {} {}", values=["w1 w2", "w4", "w5 w6"],
                                        baselines=["w10 w11", "w12", "w0 w0"])
    ref = captum_llm(model, captum_attr.FeatureAblation).attribute(inp, target=TARGET, forward_in_tokens=in_tokens)
    spans = [(0, 2), (3, 4), (4, 6)]
    got = ax.text.span_attribution(ax.feature_ablation, model_fn, params, ids("w1 w2 w3 w4 w5 w6"), ids(TARGET),
                                   spans=spans, baseline=[[10, 11], 12, 0])
    torch.testing.assert_close(got, ref.seq_attr.float(), atol=1e-5 if in_tokens else 1e-6, rtol=0)
    assert got.abs().min() > 1e-3


def test_token_input_feature_ablation_skip(lm):
    model, model_fn, params = lm
    tok = WordTokenizer()
    inp = captum_attr.TextTokenInput(PROMPT, tok, baselines=0, skip_tokens=["w3"])
    ref = captum_llm(model, captum_attr.FeatureAblation).attribute(inp, target=TARGET, forward_in_tokens=False)
    got = ax.text.span_attribution(ax.feature_ablation, model_fn, params, ids(PROMPT), ids(TARGET),
                                   spans=ax.text.token_spans(6, skip=[2]), baseline=0)
    torch.testing.assert_close(got, ref.seq_attr.float(), atol=1e-6, rtol=0)


def test_token_input_shapley_sampling_same_permutations(lm):
    model, model_fn, params = lm
    inp = captum_attr.TextTokenInput(PROMPT, WordTokenizer(), baselines="w20")
    torch.manual_seed(3)
    ref = captum_llm(model, captum_attr.ShapleyValueSampling).attribute(
        inp, target=TARGET, forward_in_tokens=False, n_samples=4)
    got = ax.text.span_attribution(ax.shapley_sampling, model_fn, params, ids(PROMPT), ids(TARGET), baseline=20,
                                   n_samples=4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, ref.seq_attr.float(), atol=1e-5, rtol=0)
    other = ax.text.span_attribution(ax.shapley_sampling, model_fn, params, ids(PROMPT), ids(TARGET), baseline=20,
                                     n_samples=4, generator=torch.Generator().manual_seed(4))
    assert (other - got).abs().max() > 1e-4  # the shared permutations matter


def test_additional_forward_args_dict(lm):
    _, model_fn, params = lm
    plain = ax.text.span_attribution(ax.feature_ablation, model_fn, params, ids(PROMPT), ids(TARGET), baseline=20)
    mask = torch.ones(1, 9, dtype=torch.long)
    got = ax.text.span_attribution(ax.feature_ablation, model_fn, params, ids(PROMPT), ids(TARGET), baseline=20,
                                   additional_forward_args={"attention_mask": mask})
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=0)
    mask[0, 0] = 0  # the mask reaches the model
    masked = ax.text.span_attribution(ax.feature_ablation, model_fn, params, ids(PROMPT), ids(TARGET), baseline=20,
                                      additional_forward_args={"attention_mask": mask})
    assert masked[0].abs() < 1e-6 and (masked - plain).abs().max() > 1e-4


def test_template_exact_shapley_values(lm):
    model, model_fn, params = lm
    inp = captum_attr.TextTemplateInput("{} w3 {} {}", values=["w1 w2", "w4", "w5 w6"],
                                        baselines=["w10 w11", "w12", "w13 w14"])
    ref = captum_llm(model, captum_attr.ShapleyValues).attribute(inp, target=TARGET, forward_in_tokens=False)
    got = ax.text.span_attribution(ax.shapley_values, model_fn, params, ids(PROMPT), ids(TARGET),
                                   spans=[(0, 2), (3, 4), (4, 6)], baseline=[[10, 11], 12, [13, 14]])
    torch.testing.assert_close(got, ref.seq_attr.float(), atol=1e-5, rtol=0)
    # efficiency: the spans share the change of the log-probability from all-baseline to the prompt
    fn, x, target, mask, base = ax.text.span_problem(model_fn, ids(PROMPT), ids(TARGET),
                                                     spans=[(0, 2), (3, 4), (4, 6)], baseline=[[10, 11], 12, [13, 14]])
    total = target(fn(params, x)) - target(fn(params, base))
    torch.testing.assert_close(got.sum(), total[0], atol=1e-5, rtol=0)


def test_problem_shapes_and_errors(lm):
    _, model_fn, params = lm
    fn, x, target, mask, base = ax.text.span_problem(model_fn, ids(PROMPT), ids(TARGET), spans=[(1, 3), (4, 5)],
                                                     baseline=[[30, 31], 32])
    assert x.tolist() == [[2, 3, 5]] and mask.tolist() == [[0, 0, 1]] and base.tolist() == [[30, 31, 32]]
    assert fn(params, x).shape == (1, 9, 50)
    with pytest.raises(ValueError, match="keep its length"):
        ax.text.span_problem(model_fn, ids(PROMPT), ids(TARGET), spans=[(0, 2)], baseline=[[1, 2, 3]])
    with pytest.raises(ValueError, match="overlaps"):
        ax.text.span_problem(model_fn, ids(PROMPT), ids(TARGET), spans=[(0, 2), (1, 3)])
