"""Layer IG from token ids on a tiny HF GPT-2: the steps folded into the batch.

``ax.layer.integrated_gradients`` evaluates the model above the layer once for all steps
(``k * B`` rows, the values that bypass the layer repeated per copy), where it used to vmap the
steps. These pin the folded path to Captum's ``LayerIntegratedGradients`` and to the vmapped path,
on a left-padded batch with an attention mask and per-sample position ids (additional forward
arguments, so the masks and the position embeddings that bypass the layer are per sample), at the
embedding and at a layer inside the residual stream, in chunks of two sizes.
"""

from __future__ import annotations

import pytest
import torch

import attrax as ax
import attrax.layer as layer_module

transformers = pytest.importorskip("transformers")
captum_attr = pytest.importorskip("captum.attr")
D = torch.float64
V, T, TOKEN = 30, 7, 5


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=V, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def batch():
    """Two left-padded sequences (lengths 7 and 4): ids, the attention mask and position ids. The mask
    is HF's 4-D additive one."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (2, T), generator=g)
    keep = torch.ones(2, T, dtype=torch.long)
    keep[1, :3] = 0
    ids[keep == 0] = 0
    allowed = keep.bool()[:, None, None, :].expand(2, 1, T, T) & torch.ones(T, T, dtype=torch.bool).tril()
    allowed = allowed | torch.eye(T, dtype=torch.bool)  # a pad query attends to itself (no all-masked row)
    mask = torch.zeros(2, 1, T, T, dtype=D).masked_fill(~allowed, torch.finfo(D).min)
    return ids, mask, (keep.cumsum(-1) - 1).clamp(min=0)


def vmapped(monkeypatch):
    """Force the previous path: the split on the plain program, the steps vmapped."""
    def split_only(model_fn, params, xs, layer, to_input, spans, full):
        return layer_module._Split(model_fn, params, xs, layer, to_input, keep="all" if full else "top"), None

    monkeypatch.setattr(layer_module, "_fold_steps", split_only)


@pytest.mark.parametrize("layer", ["transformer.wte", "transformer.h.1.mlp"])
def test_folded_layer_ig_from_ids_matches_captum_and_the_vmapped_steps(layer, monkeypatch):
    model = gpt2()
    f, p = ax.functionalize(model, output="logits")
    ids, keep, pos = batch()
    args = {"attention_mask": keep, "position_ids": pos}
    folded = []
    plan = layer_module._Folded.plan

    def spy(split, program, k):
        fold = plan(split, program, k)
        folded.append((k, fold is not None))
        return fold

    monkeypatch.setattr(layer_module._Folded, "plan", staticmethod(spy))
    tgt = ax.lm.next_token(TOKEN, position=-1, log_prob=True)
    ours, delta = ax.layer.integrated_gradients(f, p, ids, tgt, layer, baseline=0, n_steps=16, chunk_size=6,
                                                additional_forward_args=args, return_convergence_delta=True)
    assert sorted(folded) == [(4, True), (6, True)]  # chunks of 6, 6 and 4 steps, each folded

    def forward(x, mask, position_ids):
        return torch.log_softmax(model(x, attention_mask=mask, position_ids=position_ids).logits[:, -1], -1)[:, TOKEN]

    module = model.get_submodule(layer)
    lig = captum_attr.LayerIntegratedGradients(forward, module)
    theirs, their_delta = lig.attribute(ids, baselines=torch.zeros_like(ids), additional_forward_args=(keep, pos),
                                        n_steps=16, method="gausslegendre", return_convergence_delta=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(delta, their_delta, rtol=0, atol=1e-8)

    vmapped(monkeypatch)
    before = ax.layer.integrated_gradients(f, p, ids, tgt, layer, baseline=0, n_steps=16, chunk_size=6,
                                           additional_forward_args=args)
    torch.testing.assert_close(ours, before, rtol=1e-9, atol=1e-12)


def test_folded_layer_ig_on_a_layer_input_and_a_list_of_layers(monkeypatch):
    """The input of a layer (the residual stream keeps its value at x around the layer's call) and the
    embedding and the first attention layer interpolated together, folded vs vmapped."""
    model = gpt2()
    f, p = ax.functionalize(model, output="logits")
    ids, keep, pos = batch()
    args = {"attention_mask": keep, "position_ids": pos}
    tgt = ax.lm.next_token(TOKEN, position=-1)
    calls = [("transformer.h.1.mlp", dict(attribute_to_layer_input=True)),
             (["transformer.wte", "transformer.h.0.attn"], {})]
    ours = [ax.layer.integrated_gradients(f, p, ids, tgt, layer, n_steps=8, additional_forward_args=args, **kw)
            for layer, kw in calls]
    vmapped(monkeypatch)
    for (layer, kw), o in zip(calls, ours):
        ref = ax.layer.integrated_gradients(f, p, ids, tgt, layer, n_steps=8, additional_forward_args=args, **kw)
        for a, b in zip(o if isinstance(o, list) else [o], ref if isinstance(ref, list) else [ref]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
