"""span_attribution's fast paths (logits_to_keep, a shared prefix's KV cache) equal the full forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attrax as ax

transformers = pytest.importorskip("transformers")


def reference(model_fn, params, method, prompt, cont, spans=None, baseline=0, **kw):
    """span_problem's full-logits fn (no fast path), one value per span."""
    fn, x, target, mask, base = ax.text.span_problem(model_fn, prompt, cont, spans=spans, baseline=baseline)
    attr = method(fn, params, x, target, feature_mask=mask, baseline=base, **kw)
    k = int(mask.max()) + 1
    return attr[0, torch.stack([(mask[0] == g).nonzero()[0, 0] for g in range(k)])]


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=48)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def lengths_seen(model):
    """Record the sequence length the model's body and its LM head see in each call."""
    seen = {"body": [], "head": []}
    body = model.get_submodule("transformer" if hasattr(model, "transformer") else "model")
    body.register_forward_pre_hook(lambda m, a, kw: seen["body"].append((a[0] if a else kw["input_ids"]).shape[1]),
                                   with_kwargs=True)
    model.lm_head.register_forward_pre_hook(lambda m, a: seen["head"].append(a[0].shape[1]))
    return seen


@pytest.mark.parametrize("make", [gpt2, llama])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_paths_equal_full_forward(make, dtype):
    model = make().to(dtype)
    model_fn, params = ax.functionalize(model, output="logits")
    g = torch.Generator().manual_seed(3)
    prompt, cont = torch.randint(1, 64, (30,), generator=g), torch.randint(1, 64, (3,), generator=g)
    seen = lengths_seen(model)
    for spans, baseline in [(None, 0), ([(2, 5), (9, 10), (20, 28)], [7, 8, [1, 2, 3, 4, 5, 6, 7, 8]])]:
        for chunk in (None, 1, 4):
            kw = {} if chunk is None else {"chunk_size": chunk}
            got = ax.text.span_attribution(ax.feature_ablation, model_fn, params, prompt, cont, spans=spans,
                                           baseline=baseline, **kw)
            ref = reference(model_fn, params, ax.feature_ablation, prompt, cont, spans, baseline)
            # logits_to_keep alone is exact; the prefix cache batches differently: a few ulps of the ~-12 log-probs
            torch.testing.assert_close(got, ref, atol=4e-6 if dtype == torch.float32 else 1e-12, rtol=0)
    assert set(seen["head"]) >= {4, 33}  # logits_to_keep = m + 1 in span_attribution, all 33 in span_problem's fn
    assert min(seen["body"]) < 33 - 20  # rows perturbed late ran from the shared prefix's cache


def test_shapley_sampling_fast_paths():
    model = gpt2()
    model_fn, params = ax.functionalize(model, output="logits")
    prompt, cont = torch.arange(1, 13), torch.tensor([20, 21])
    got = ax.text.span_attribution(ax.shapley_sampling, model_fn, params, prompt, cont, n_samples=3,
                                   generator=torch.Generator().manual_seed(0))
    ref = reference(model_fn, params, ax.shapley_sampling, prompt, cont, n_samples=3,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


class Out:
    def __init__(self, logits, past_key_values):
        self.logits, self.past_key_values = logits, past_key_values


class Bidirectional(nn.Module):
    """Names logits_to_keep and past_key_values like an HF causal LM, but every position sees the whole
    sequence it is given (and ignores the cache): the shared-prefix path must notice and turn itself off."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 64)

    def forward(self, input_ids, past_key_values=None, use_cache=None, logits_to_keep=0):
        from transformers.cache_utils import DynamicCache

        h = self.emb(input_ids)
        h = h + h.mean(1, keepdim=True)
        logits = self.head(h[:, -logits_to_keep:] if logits_to_keep else h)
        cache = DynamicCache.from_legacy_cache(((h.unsqueeze(1), h.unsqueeze(1)),)) if use_cache else None
        return Out(logits, cache)


def test_non_causal_model_turns_the_prefix_path_off():
    torch.manual_seed(0)
    model = Bidirectional().eval()
    model_fn, params = ax.functionalize(model, output="logits")
    prompt, cont = torch.arange(1, 21), torch.tensor([30, 31])
    got = ax.text.span_attribution(ax.feature_ablation, model_fn, params, prompt, cont, chunk_size=2)
    ref = reference(model_fn, params, ax.feature_ablation, prompt, cont)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_attention_mask_keeps_the_full_forward():
    model = gpt2()
    model_fn, params = ax.functionalize(model, output="logits")
    prompt, cont = torch.arange(1, 11), torch.tensor([20, 21])
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, 0] = 0
    got = ax.text.span_attribution(ax.feature_ablation, model_fn, params, prompt, cont,
                                   additional_forward_args={"attention_mask": mask})
    fn, x, target, fmask, base = ax.text.span_problem(model_fn, prompt, cont)
    ref = ax.feature_ablation(fn, params, x, target, feature_mask=fmask, baseline=base,
                              additional_forward_args={"attention_mask": mask})[0]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert got[0] == 0


def test_shared_prefix_is_off_for_sliding_windows_and_other_modules():
    """Review findings: a sliding-window cache keeps only the last window of keys (wrong keys, or a crash);
    a module that only names past_key_values may look ahead slightly and pass a numeric check."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.MistralForCausalLM(transformers.MistralConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=50, max_position_embeddings=64, sliding_window=4)).double().eval()
    f, p = ax.functionalize(m, output="logits")
    prompt, cont = torch.tensor([9, 31, 4, 17, 8, 3]), torch.tensor([22, 5])
    fn, x, t, fm, b = ax.text.span_problem(f, prompt, cont)
    for method, seeded in ((ax.feature_ablation, False), (ax.lime, True)):
        kw = lambda: {"n_samples": 12, "generator": torch.Generator().manual_seed(3)} if seeded else {}  # noqa: E731
        got = ax.text.span_attribution(method, f, p, prompt, cont, chunk_size=1, **kw())
        ref = method(fn, p, x, t, feature_mask=fm, baseline=b, chunk_size=1, **kw())
        torch.testing.assert_close(got, ref[0], rtol=0, atol=1e-12)


def test_shared_prefix_follows_params_edited_in_place():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=4, vocab_size=30,
                                                              n_positions=32)).double().eval()
    f, p = ax.functionalize(m, output="logits")
    prompt, cont = torch.tensor([3, 7, 1, 9, 4]), torch.tensor([2, 6])
    fn, x, t, fm, b = ax.text.span_problem(f, prompt, cont)
    ax.feature_ablation(fn, p, x, t, feature_mask=fm, baseline=b)
    with torch.no_grad():
        p["transformer.h.0.attn.c_attn.weight"].mul_(1.5)
    got = ax.feature_ablation(fn, p, x, t, feature_mask=fm, baseline=b)
    fresh = ax.text.span_problem(ax.functionalize(m, output="logits")[0], prompt, cont)
    want = ax.feature_ablation(fresh[0], p, *fresh[1:3], feature_mask=fresh[3], baseline=fresh[4])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
