"""HF's 2-D attention mask under the rule methods (DeepLift, AttnLRP, CP-LRP, LRP).

transformers (4.5x) builds the 4-D mask from the tokenizer's (B, T) 0/1 ``attention_mask`` under
its own nested ``torch.vmap``. The trace folds that construction into a constant of the program,
and erases the dead nodes the vmap's exit leaves in the traced graph (``rewrite._drop_transform_residue``).

1. A padded batch (right- and left-padded for the causal LMs; Mistral with a sliding window shorter
   than the sequence) with the 2-D mask gives each sequence's attribution alone (its unpadded ids,
   no mask) to 1e-6 in float64, and the pads get exactly zero.
2. The 2-D mask gives what the 4-D additive mask gives (BERT: its 3-D mask) on the same batch.
3. Another mask, a new tensor or the same one edited in place, gives a new program, never a stale one.
4. ``vmap`` over targets works with a 2-D mask.
5. A model's own vmap over values of x or params is still refused, naming the problem.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import attrax as ax

transformers = pytest.importorskip("transformers")
D = torch.float64
V, T, WINDOW = 30, 7, 3  # Mistral's sliding window is shorter than the longest sequence
LENGTHS = [7, 4, 2]  # the first sequence fills the batch, the others are padded
TOKEN = 5  # the explained next token (causal LMs); BERT explains class 1
LAYER = {"gpt2": "transformer.wte", "llama": "model.embed_tokens", "mistral": "model.embed_tokens",
         "bert": "bert.embeddings.word_embeddings"}


def build(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=24, vocab_size=V,
                 max_position_embeddings=16)
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=V,
                                                                     n_positions=16))
    elif name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, num_key_value_heads=2))
    elif name == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            **{**small, "num_key_value_heads": 2, "sliding_window": WINDOW, **overrides}))
    else:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**small, num_labels=3))
    return model.double().eval()


@functools.cache
def model_fn(name: str):
    """One functional model per family, shared by the tests: programs traced for the same mask
    tensors are reused between methods (the tests never edit these masks)."""
    return ax.functionalize(build(name), output="logits", embedding=LAYER[name])


@functools.cache
def batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and the 2-D mask; pads hold token 0 (any id: they are masked)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    keep = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        ids[i, real(i, side)] = torch.randint(1, V, (n,), generator=g)
        keep[i, real(i, side)] = 1
    return ids, keep


def real(i: int, side: str) -> slice:
    return slice(0, LENGTHS[i]) if side == "right" else slice(T - LENGTHS[i], T)


@functools.cache
def forward_args(side: str, kind: str, name: str) -> dict:
    """The batch's mask as HF's 2-D one, or the existing alternative (BERT's 3-D 0/1 mask, the causal
    LMs' 4-D additive mask with Mistral's window); left padding passes position ids (HF counts
    positions from the first column otherwise). Cached: the same tensors for every method."""
    keep = batch(side)[1]
    mask = keep if kind == "2d" else mask3d(keep) if name == "bert" else mask4d(keep, WINDOW if name == "mistral" else T)
    args = {"attention_mask": mask}
    if side == "left":
        args["position_ids"] = (keep.cumsum(-1) - 1).clamp(min=0)
    return args


def mask4d(keep: torch.Tensor, window: int) -> torch.Tensor:
    """A causal LM's additive (B, 1, T, T) mask: 0 where a query may attend to a key (real, not later,
    fewer than ``window`` columns back), the dtype's min elsewhere."""
    b, t = keep.shape
    band = torch.ones(t, t, dtype=torch.bool).tril() & ~torch.ones(t, t, dtype=torch.bool).tril(-window)
    allowed = keep.bool()[:, None, None, :].expand(b, 1, t, t) & band
    allowed = allowed | torch.eye(t, dtype=torch.bool)  # a pad attends to itself: no fully masked row
    return torch.zeros(b, 1, t, t, dtype=D).masked_fill(~allowed, torch.finfo(D).min)


def mask3d(keep: torch.Tensor) -> torch.Tensor:
    """BERT's (B, T, T) 0/1 mask: every query sees the real keys."""
    return (keep[:, None, :].expand(-1, keep.shape[1], -1) | torch.eye(keep.shape[1], dtype=keep.dtype)).to(D)


def target(name: str, keep: torch.Tensor, side: str):
    if name == "bert":
        return 1
    if side == "right":
        return ax.lm.next_token(TOKEN, position=keep.sum(1) - 1)  # each sequence's last real position
    return ax.lm.next_token(TOKEN, position=-1)


METHODS = {
    "deeplift": lambda f, p, e, t, args: ax.deeplift(f, p, e, t, additional_forward_args=args),
    "attn_lrp": lambda f, p, e, t, args: ax.lrp(f, p, e, t, composite=ax.composites.attn_lrp(),
                                                additional_forward_args=args),
    "cp_lrp": lambda f, p, e, t, args: ax.lrp(f, p, e, t, composite=ax.composites.cp_lrp(),
                                              additional_forward_args=args),
    "lrp": lambda f, p, e, t, args: ax.lrp(f, p, e, t, additional_forward_args=args),
}
CASES = [("gpt2", "right"), ("gpt2", "left"), ("llama", "right"), ("llama", "left"), ("mistral", "right"),
         ("mistral", "left"), ("bert", "right")]


@pytest.mark.parametrize("name,side", CASES)
def test_padded_batch_with_the_2d_mask_equals_each_sequence_alone(name: str, side: str) -> None:
    f, p = model_fn(name)
    ids, keep = batch(side)
    e = f.embed(p, ids)
    # every method on one input before the next input: they share its programs (the memo is small)
    together = {m: call(f, p, e, target(name, keep, side), forward_args(side, "2d", name)) for m, call in METHODS.items()}
    for i in range(len(LENGTHS)):
        r = real(i, side)
        for method, call in METHODS.items():
            alone = call(f, p, e[i:i + 1, r], target(name, keep[i:i + 1, r], side), None)
            assert alone.abs().max() > 0
            torch.testing.assert_close(together[method][i:i + 1, r], alone, rtol=1e-6, atol=1e-9,
                                       msg=lambda m: f"{method}, sequence {i} (length {LENGTHS[i]}): {m}")
            pads = together[method][i][keep[i] == 0]
            assert torch.equal(pads, torch.zeros_like(pads)), \
                f"{method}, sequence {i}: pads got {pads.abs().max().item():.3g}"


@pytest.mark.parametrize("name,side", CASES)
def test_the_2d_mask_equals_the_4d_mask(name: str, side: str) -> None:
    f, p = model_fn(name)
    ids, keep = batch(side)
    e = f.embed(p, ids)
    t = target(name, keep, side)
    two = {m: call(f, p, e, t, forward_args(side, "2d", name)) for m, call in METHODS.items()}
    for method, call in METHODS.items():
        four = call(f, p, e, t, forward_args(side, "4d", name))
        torch.testing.assert_close(two[method], four, rtol=1e-6, atol=1e-9, msg=lambda m: f"{method}: {m}")


def test_mistral_sliding_window_is_in_effect() -> None:
    """The window changes the 2-D-mask result (so the window above is really exercised)."""
    f, p = model_fn("mistral")
    wide, _ = ax.functionalize(build("mistral", sliding_window=None), output="logits", embedding=LAYER["mistral"])
    ids, keep = batch("right")
    e = f.embed(p, ids)
    t = target("mistral", keep, "right")
    a = ax.deeplift(f, p, e, t, additional_forward_args=forward_args("right", "2d", "mistral"))
    b = ax.deeplift(wide, p, e, t, additional_forward_args=forward_args("right", "2d", "mistral"))
    assert (a[0] - b[0]).abs().max() > 1e-3 * a[0].abs().max()  # length 7 > window 3: differs
    torch.testing.assert_close(a[2], b[2])  # length 2 < window: the same


@pytest.mark.parametrize("method", ["deeplift", "attn_lrp"])
def test_another_mask_never_reuses_a_program(method: str) -> None:
    """A new mask tensor, and the same tensor edited in place, each give what a fresh model (no
    memoised programs) gives for that mask; editing it back gives the first result again."""
    f, p = model_fn("gpt2")
    call = METHODS[method]
    ids, keep = batch("right")
    e = f.embed(p, ids)
    t = target("gpt2", keep, "right")

    def fresh(mask: torch.Tensor) -> torch.Tensor:
        g, q = ax.functionalize(f.module, output="logits", embedding=LAYER["gpt2"])
        return call(g, q, e, t, {"attention_mask": mask.clone()})

    mask = keep.clone()
    first = call(f, p, e, t, {"attention_mask": mask})
    holed = keep.clone()
    holed[0, 2] = 0  # a hole in the first sequence: its token 2 is no longer seen
    second = call(f, p, e, t, {"attention_mask": holed})
    torch.testing.assert_close(second, fresh(holed), rtol=0, atol=0)
    assert torch.equal(second[0, 2], torch.zeros_like(second[0, 2])) and not torch.equal(second[0], first[0])
    torch.testing.assert_close(second[1:], first[1:], rtol=1e-12, atol=1e-15)
    mask[0, 2] = 0  # the first mask, edited in place
    torch.testing.assert_close(call(f, p, e, t, {"attention_mask": mask}), second, rtol=0, atol=0)
    mask[0, 2] = 1
    torch.testing.assert_close(call(f, p, e, t, {"attention_mask": mask}), first, rtol=0, atol=0)


@pytest.mark.parametrize("edit", ["data", "numpy"])
def test_a_mask_edited_without_its_version_counter_never_reuses_a_program(edit: str) -> None:
    """Edits through ``.data`` or a shared numpy buffer leave the version counter alone: programs are keyed on
    the bound arguments' values too (they were served the old program, 5e-4 off, before)."""
    f, p = model_fn("gpt2")
    ids, keep = batch("right")
    e, t = f.embed(p, ids), target("gpt2", keep, "right")
    array = keep.clone().numpy()
    mask = torch.from_numpy(array) if edit == "numpy" else keep.clone()
    first = METHODS["deeplift"](f, p, e, t, {"attention_mask": mask})
    if edit == "numpy":
        array[0, 2] = 0
    else:
        mask.data[0, 2] = 0
    second = METHODS["deeplift"](f, p, e, t, {"attention_mask": mask})
    g, q = ax.functionalize(f.module, output="logits", embedding=LAYER["gpt2"])
    torch.testing.assert_close(second, METHODS["deeplift"](g, q, e, t, {"attention_mask": mask.clone()}), rtol=0, atol=0)
    assert not torch.equal(first[0], second[0]) and torch.equal(second[0, 2], torch.zeros_like(second[0, 2]))


def test_vmap_over_targets_with_the_2d_mask() -> None:
    """Traced under the vmap (a model of its own: no program memoised before)."""
    f, p = ax.functionalize(build("gpt2"), output="logits", embedding=LAYER["gpt2"])
    ids, keep = batch("left")
    e = f.embed(p, ids)
    args = forward_args("left", "2d", "gpt2")
    comp = ax.composites.attn_lrp()
    tokens = torch.tensor([3, TOKEN, 9])
    vm = torch.func.vmap(lambda tok: ax.lrp(f, p, e, ax.lm.next_token(tok, position=-1), composite=comp,
                                            additional_forward_args=args))(tokens)
    loop = torch.stack([ax.lrp(f, p, e, ax.lm.next_token(int(tok), position=-1), composite=comp,
                               additional_forward_args=args) for tok in tokens])
    torch.testing.assert_close(vm, loop)
    assert torch.equal(vm[:, keep == 0], torch.zeros_like(vm[:, keep == 0]))


class VmapOverX(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        scale = torch.arange(1.0, 5.0).expand(x.shape[0], 4).clone()
        return self.lin(torch.vmap(lambda row, s: torch.relu(row * s))(x, scale))


class VmapMeetsParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        table = torch.arange(8.0).view(2, 4)  # a constant, batched by the vmap, times a parameter
        return self.lin(x) @ torch.vmap(lambda row: row * self.lin.weight[0])(table).T


@pytest.mark.parametrize("module, message", [
    (VmapOverX, "torch.vmap .* over values computed from x or params"),
    (VmapMeetsParams, "a value batched by it is used by the computation on x or params"),
])
def test_a_models_own_vmap_over_x_or_params_is_refused(module, message) -> None:
    torch.manual_seed(0)
    f, p = ax.functionalize(module())
    x = torch.randn(3, 4)
    assert f(p, x).shape[0] == 3  # the model itself runs
    with pytest.raises(ValueError, match=message):
        ax.deeplift(f, p, x, 0)
    ax.gradient(f, p, x, 0)  # gradient methods call the model for real
