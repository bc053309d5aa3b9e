"""Padded batches of HF models from token ids (issue 17, acceptance 2).

A batch of sequences of different lengths, right- and left-padded, run through
``ax.functionalize(model, output="logits", embedding=...)``, gives each sequence's attribution
alone (1e-6) for IG, DeepLift, AttnLRP and feature ablation, and the pads get exactly zero.

IG and feature ablation take HF's 2-D attention mask here; the rule methods (DeepLift, AttnLRP)
take the 4-D additive mask (BERT, whose forward takes 2-D or 3-D masks: its (B, T, T) 0/1 mask), the
mask a user builds by hand. Rule methods take the 2-D mask as well: tests/test_hf_masks.py checks that
path, and that it equals this one. Left padding passes position ids (HF counts positions
from the first column otherwise), and a causal LM right-padded explains each sequence's last real
position: ``ax.lm.next_token(tok, position=lengths - 1)``. BERT (sequence classification from its
first token) is right-padded only: left padding moves its [CLS] token.
"""

from __future__ import annotations

import pytest
import torch

import attrax as ax

transformers = pytest.importorskip("transformers")
D = torch.float64
V, T = 30, 7
LENGTHS = [7, 4, 2]  # the first sequence fills the batch, the others are padded
TOKEN = 5  # the explained next token (causal LMs); BERT explains class 1


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=V, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg), "transformer.wte"


def llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=24, vocab_size=V, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg), "model.embed_tokens"


def bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=24,
                                  vocab_size=V, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg), "bert.embeddings.word_embeddings"


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert}
CASES = [("gpt2", "right"), ("gpt2", "left"), ("llama", "right"), ("llama", "left"), ("bert", "right")]


def model_fn(name: str):
    torch.manual_seed(0)
    model, layer = MODELS[name]()
    return ax.functionalize(model.double().eval(), output="logits", embedding=layer)


def mask4d(keep: torch.Tensor) -> torch.Tensor:
    """A causal LM's additive (B, 1, T, T) mask: 0 where a query may attend to a key, the dtype's min elsewhere."""
    b, t = keep.shape
    allowed = keep.bool()[:, None, None, :].expand(b, 1, t, t) & torch.ones(t, t, dtype=torch.bool).tril()
    allowed = allowed | torch.eye(t, dtype=torch.bool)  # a pad attends to itself: no fully masked row
    return torch.zeros(b, 1, t, t, dtype=D).masked_fill(~allowed, torch.finfo(D).min)


def batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and the 2-D mask; pads hold token 0 (any id: they are masked)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    keep = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        real = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, real] = torch.randint(1, V, (n,), generator=g)
        keep[i, real] = 1
    return ids, keep


def real(i: int, side: str) -> slice:
    return slice(0, LENGTHS[i]) if side == "right" else slice(T - LENGTHS[i], T)


def mask3d(keep: torch.Tensor) -> torch.Tensor:
    """BERT's (B, T, T) 0/1 mask (its forward takes 2-D or 3-D masks): every query sees the real keys."""
    return (keep[:, None, :].expand(-1, keep.shape[1], -1) | torch.eye(keep.shape[1], dtype=keep.dtype)).to(D)


def forward_args(keep: torch.Tensor, side: str, name: str, rule: bool) -> dict:
    mask = keep if not rule else mask3d(keep) if name == "bert" else mask4d(keep)
    args: dict = {"attention_mask": mask}
    if side == "left":
        args["position_ids"] = (keep.cumsum(-1) - 1).clamp(min=0)
    return args


def target(name: str, keep: torch.Tensor, side: str):
    if name == "bert":
        return 1
    if side == "right":
        return ax.lm.next_token(TOKEN, position=keep.sum(1) - 1)  # each sequence's last real position
    return ax.lm.next_token(TOKEN, position=-1)


METHODS = {
    "integrated_gradients": (False, lambda f, p, e, t, args: ax.integrated_gradients(
        f, p, e, t, n_steps=6, chunk_size=4, additional_forward_args=args)),
    "feature_ablation": (False, lambda f, p, e, t, args: ax.feature_ablation(
        f, p, e, t, feature_mask=torch.arange(e.shape[1]).view(1, -1, 1).expand(e.shape), chunk_size=3,
        additional_forward_args=args)),
    "deeplift": (True, lambda f, p, e, t, args: ax.deeplift(f, p, e, t, additional_forward_args=args)),
    "attn_lrp": (True, lambda f, p, e, t, args: ax.lrp(f, p, e, t, composite=ax.composites.attn_lrp(),
                                                        additional_forward_args=args)),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name,side", CASES)
def test_padded_batch_equals_each_sequence_alone(name: str, side: str, method: str) -> None:
    f, p = model_fn(name)
    rule, call = METHODS[method]
    ids, keep = batch(side)
    e = f.embed(p, ids)
    together = call(f, p, e, target(name, keep, side), forward_args(keep, side, name, rule))
    assert together.shape == e.shape
    for i in range(len(LENGTHS)):
        r = real(i, side)
        alone_keep = keep[i:i + 1, r]
        alone = call(f, p, e[i:i + 1, r], target(name, alone_keep, side), forward_args(alone_keep, side, name, rule))
        torch.testing.assert_close(together[i:i + 1, r], alone, rtol=1e-6, atol=1e-9,
                                   msg=lambda m: f"sequence {i} (length {LENGTHS[i]}): {m}")
        pads = together[i][keep[i] == 0]
        assert torch.equal(pads, torch.zeros_like(pads)), f"sequence {i}: pads got {pads.abs().max().item():.3g}"


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_id_feature_ablation_with_a_pad_baseline(side: str) -> None:
    """Feature ablation on the ids themselves (``functionalize(model, output="logits")``): each token
    replaced by a baseline id; pads get exactly zero and sequences equal themselves alone."""
    torch.manual_seed(0)
    model, _ = gpt2()
    f, p = ax.functionalize(model.double().eval(), output="logits")
    ids, keep = batch(side)
    args = forward_args(keep, side, "gpt2", rule=False)
    together = ax.feature_ablation(f, p, ids, target("gpt2", keep, side), baseline=0, chunk_size=2,
                                   additional_forward_args=args)
    assert together.dtype == D and together.shape == ids.shape
    for i in range(len(LENGTHS)):
        r = real(i, side)
        alone_keep = keep[i:i + 1, r]
        alone = ax.feature_ablation(f, p, ids[i:i + 1, r], target("gpt2", alone_keep, side), baseline=0,
                                    additional_forward_args=forward_args(alone_keep, side, "gpt2", rule=False))
        torch.testing.assert_close(together[i:i + 1, r], alone, rtol=1e-6, atol=1e-9)
        pads = together[i][keep[i] == 0]
        assert torch.equal(pads, torch.zeros_like(pads))
