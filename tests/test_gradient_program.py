"""Gradient methods on a traced program where it is faster (``rewrite.gradient_program``): activations written
out in steps run fused, an LM target at one position gets the head at that position only. The numbers are the
model's own gradients (to rounding), and every case the program cannot serve runs the model as it is."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attrax as ax
from attrax.rewrite import gradient_program

transformers = pytest.importorskip("transformers")
D = torch.float64


def gpt2(n_embd: int = 16) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=n_embd, n_head=4, vocab_size=40, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def eager(f):
    """The same model function, not a FunctionalModel: always the model as it is."""
    return lambda p, *x: f(p, *x)


def _embeddings(f, p, batch=2, seq=7, seed=1):
    ids = torch.randint(0, 40, (batch, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return f.embed(p, ids)


@pytest.mark.parametrize("method", ["integrated_gradients", "saliency", "input_x_gradient"])
@pytest.mark.parametrize("target", ["next_token", "log_prob", "contrast", "int_on_last"])
def test_gpt2_gradients_on_the_program_equal_the_models(method, target):
    model = gpt2()
    f, p = ax.functionalize(model, output="logits", embedding="transformer.wte")
    x = _embeddings(f, p)
    t = {"next_token": ax.lm.next_token(5, -1), "log_prob": ax.lm.next_token(torch.tensor([3, 9]), 4, log_prob=True),
         "contrast": ax.lm.contrast(5, 6, 2), "int_on_last": lambda o: o[:, -1, 5]}[target]
    kw = {"n_steps": 16} if method == "integrated_gradients" else {}
    got = getattr(ax, method)(f, p, x, t, **kw)
    want = getattr(ax, method)(eager(f), p, x, t, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the program is used: GPT-2's gelu_new fused; the head at the target's position only where it names it
    fast = gradient_program(f, p, (x,), getattr(t, "attrax_rows", (None, None))[:2] if hasattr(t, "attrax_rows") else None)
    assert fast is not None
    program, _, selected = fast
    packets = [n.packet for n in program.nodes if n.op == "call"]
    assert packets.count("gelu") == 2 and "tanh" not in packets
    assert selected == hasattr(t, "attrax_rows")
    if selected:
        assert program.nodes[program.output].shape == (2, 40)


def test_head_at_one_position_and_the_published_output():
    """value_and_attribution keeps the model's own graph (and its whole output)."""
    model = gpt2()
    f, p = ax.functionalize(model, output="logits", embedding="transformer.wte")
    x = _embeddings(f, p)
    t = ax.lm.next_token(5, -1)
    out, attr = ax.value_and_attribution(ax.saliency, f, p, x, t)
    assert out.shape == (2, 7, 40)
    torch.testing.assert_close(attr, ax.saliency(eager(f), p, x, t), rtol=1e-10, atol=1e-12)


def test_a_changed_model_is_traced_again():
    model = gpt2()
    f, p = ax.functionalize(model, output="logits", embedding="transformer.wte")
    x = _embeddings(f, p)
    t = ax.lm.next_token(5, -1)
    first = ax.saliency(f, p, x, t)
    for block in model.transformer.h:
        block.mlp.act = nn.ReLU()
    got = ax.saliency(f, p, x, t)
    assert not torch.allclose(got, first)
    torch.testing.assert_close(got, ax.saliency(eager(f), p, x, t), rtol=1e-10, atol=1e-12)


def test_models_without_a_gain_run_as_they_are():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    f, p = ax.functionalize(cnn)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    assert gradient_program(f, p, (x,)) is None
    torch.testing.assert_close(ax.saliency(f, p, x, 1), ax.saliency(eager(f), p, x, 1), rtol=0, atol=0)


class _Gelu(nn.Module):
    def forward(self, h):
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))


class _Mlp(nn.Module):
    def __init__(self, extra=None):
        super().__init__()
        self.fc, self.act, self.out, self.extra = nn.Linear(5, 8), _Gelu(), nn.Linear(8, 3), extra

    def forward(self, x):
        h = self.act(self.fc(x))
        if self.extra == "noise":
            h = h + 0.01 * torch.randn_like(h)
        if self.extra == "branch" and bool(h.sum() > 0):  # data-dependent control flow: the tracer refuses it
            h = -h
        return self.out(h)


def test_written_out_activation_runs_fused_and_training_random_and_untraceable_models_do_not():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=D)
    m = _Mlp().double().eval()
    f, p = ax.functionalize(m)
    assert gradient_program(f, p, (x,)) is not None
    torch.testing.assert_close(ax.integrated_gradients(f, p, x, 1, n_steps=8),
                               ax.integrated_gradients(eager(f), p, x, 1, n_steps=8), rtol=1e-12, atol=1e-14)
    m.train()
    assert gradient_program(f, p, (x,)) is None
    for extra in ("noise", "branch"):
        m = _Mlp(extra).double().eval()
        f, p = ax.functionalize(m)
        assert gradient_program(f, p, (x,)) is None
        g = ax.saliency(f, p, x, 1)  # runs (the model as it is)
        assert g.shape == x.shape


def test_lm_positions_outside_the_logits_are_errors_not_wraps():
    model = gpt2()
    f, p = ax.functionalize(model, output="logits", embedding="transformer.wte")
    x = _embeddings(f, p)
    with pytest.raises(ValueError, match="position 7 is outside the 7 positions"):
        ax.saliency(f, p, x, ax.lm.next_token(5, 7))
    with pytest.raises(ValueError, match="position -8 is outside"):
        ax.saliency(f, p, x, ax.lm.next_token(5, -8))
    with pytest.raises(ValueError, match="position 9 is outside"):
        ax.saliency(f, p, x, ax.lm.next_token(5, torch.tensor([1, 9])))
    with pytest.raises(ValueError, match="predicting token k"):
        ax.saliency(f, p, x, ax.lm.continuation(torch.tensor([1, 2]), 0))
    with pytest.raises(ValueError, match="predicting token k"):
        ax.saliency(f, p, x, ax.lm.continuation(torch.tensor([1, 2]), 7))
    ax.saliency(f, p, x, ax.lm.continuation(torch.tensor([1, 2]), 5))  # positions 4 and 5: fine


def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=24, vocab_size=40, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("make, layer", [(gpt2, "transformer.wte"), (llama, "model.embed_tokens")])
def test_lm_target_at_one_position_runs_the_last_rows_only(make, layer):
    """select_pushdown: the selection of the target's position moves up through the head, the final norm, the last
    block's MLP and its attention output projection; the gradients are the model's."""
    model = make()
    f, p = ax.functionalize(model, output="logits", embedding=layer)
    x = _embeddings(f, p, batch=3, seq=9)
    for position in (-1, 4):
        t = ax.lm.next_token(torch.tensor([1, 2, 3]), position, log_prob=True)
        program, _, selected = gradient_program(f, p, (x,), t.attrax_rows[:2])
        assert selected
        dense = [n for n in program.nodes if n.op == "call" and n.packet in ("linear", "addmm", "mm", "matmul")]
        assert len(dense[-1].shape) == 2 and len(dense[-2].shape) == 2  # head and the last MLP projection: one row
        assert len(dense[0].shape) == 3  # the first block: every position
        torch.testing.assert_close(ax.integrated_gradients(f, p, x, t, n_steps=4),
                                   ax.integrated_gradients(eager(f), p, x, t, n_steps=4), rtol=1e-10, atol=1e-12)


class _Rows(nn.Module):
    """Row-local steps whose selection moves (a broadcast mask, a value read twice) and one it must not pass."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 5)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5)[None, :, None])  # (1, T, 1): selected too

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x), approximate="tanh")
        h = self.b(h) * self.scale + h.mean(1, keepdim=True)  # the mean over positions reads every row of h
        h = h * torch.linspace(1.0, 2.0, 6, dtype=x.dtype)  # a constant without the dim
        return self.head(torch.layer_norm(h, (6,)))


def test_selection_stops_where_a_row_needs_other_rows():
    from attrax.rewrite import select_pushdown  # noqa: F401 - the pass under test

    torch.manual_seed(0)
    m = _Rows().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 5, 4, dtype=D)
    t = ax.lm.next_token(3, 2)
    program, _, selected = gradient_program(f, p, (x,), t.attrax_rows[:2])
    assert selected
    shapes = {n.module: n.shape for n in program.nodes if n.op == "call" and n.packet == "linear"}
    assert shapes == {"a": (2, 5, 6), "b": (2, 6), "head": (2, 5)}  # a's output is read by the mean: whole
    torch.testing.assert_close(ax.saliency(f, p, x, t), ax.saliency(eager(f), p, x, t), rtol=1e-12, atol=1e-14)
