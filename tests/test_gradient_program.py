"""Gradient methods on a traced program where it is faster (``rewrite.gradient_program``): activations written
out in steps run fused, an LM target at one position gets the head at that position only. The numbers are the
model's own gradients (to rounding), and every case the program cannot serve runs the model as it is."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import attrax as ax
from attrax.rewrite import gradient_program

transformers = pytest.importorskip("transformers")
D = torch.float64


@pytest.fixture(autouse=True)
def trace_at_first_call(monkeypatch):
    """Gradient methods trace for the program at the third call of a spec; here at the first, to test it."""
    monkeypatch.setattr("attrax.rewrite.GRADIENT_PROGRAM_AFTER", 1)


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
    with pytest.raises(ValueError, match="position = 7 is outside the 7 positions"):
        ax.saliency(f, p, x, ax.lm.next_token(5, 7))
    with pytest.raises(ValueError, match="position = -8 is outside"):
        ax.saliency(f, p, x, ax.lm.next_token(5, -8))
    with pytest.raises(ValueError, match="position = 9 is outside"):
        ax.saliency(f, p, x, ax.lm.next_token(5, torch.tensor([1, 9])))
    with pytest.raises(ValueError, match=r"start \+ k - 1 = -1 is outside"):
        ax.saliency(f, p, x, ax.lm.continuation(torch.tensor([1, 2]), 0))
    with pytest.raises(ValueError, match=r"start \+ k - 1 = 7 is outside"):
        ax.saliency(f, p, x, ax.lm.continuation(torch.tensor([1, 2]), 7))
    import numpy as np

    with pytest.raises(ValueError, match="position = 9 is outside"):  # numpy ints and lists are checked too
        ax.saliency(f, p, x, ax.lm.next_token(5, np.int64(9)))
    with pytest.raises(ValueError, match="position = 9 is outside"):
        ax.saliency(f, p, x, ax.lm.next_token(5, [1, 9]))
    with pytest.raises(ValueError, match="position = 9 is outside"):
        ax.saliency(f, p, x, ax.lm.next_token(5, np.array([1, 9])))
    torch.testing.assert_close(ax.saliency(f, p, x, ax.lm.next_token(5, np.array([4, 3]))),
                               ax.saliency(f, p, x, ax.lm.next_token(5, torch.tensor([4, 3]))))
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


def test_a_selection_the_model_makes_itself_moves_up_too():
    model = gpt2()
    f, p = ax.functionalize(model, output=lambda o: o.logits[:, -1], embedding="transformer.wte")
    x = _embeddings(f, p)
    program, _, selected = gradient_program(f, p, (x,))
    assert not selected and program.nodes[program.output].shape == (2, 40)
    last_mlp = [n for n in program.nodes if n.op == "call" and n.packet == "linear" and n.module == "transformer.h.1.mlp.c_proj"]
    assert [n.shape for n in last_mlp] == [(2, 16)]
    torch.testing.assert_close(ax.integrated_gradients(f, p, x, 7, n_steps=4),
                               ax.integrated_gradients(eager(f), p, x, 7, n_steps=4), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make, layer", [(gpt2, "transformer.wte"), (llama, "model.embed_tokens")])
def test_lrp_with_a_selected_output_runs_the_last_rows_only(make, layer):
    """lrp moves the output's selection up through the nodes whose rules treat rows alone (lrp._rows_first): the
    relevance equals the same model explained over every position with the selection in the target."""
    from attrax.lrp import _prepare
    from attrax.rewrite import program_spec

    model = make()
    f, p = ax.functionalize(model, output=lambda o: o.logits[:, -1], embedding=layer)
    whole, pw = ax.functionalize(model, output="logits", embedding=layer)
    x = _embeddings(f, p, batch=2, seq=8)
    t = torch.tensor([3, 7])
    spec, batch = program_spec(f, p, (x,))
    for comp in (ax.composites.attn_lrp(), ax.composites.cp_lrp(), ax.composites.attn_lrp(epsilon=0.0)):
        program = _prepare(f, spec, batch, comp, None, False, release=True)[0]
        mlp_out = [n for n in program.nodes if n.op == "call" and n.packet == "linear"][-2]
        assert len(mlp_out.shape) == 2  # the last block's MLP projection on the selected row
        got = ax.lrp(f, p, x, t, composite=comp)
        want = ax.lrp(whole, pw, x, lambda o: o[:, -1].gather(1, t[:, None])[:, 0], composite=comp)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_lrp_keeps_every_row_where_a_rule_reads_them_all():
    model = llama()
    f, p = ax.functionalize(model, output=lambda o: o.logits[:, -1], embedding="model.embed_tokens")
    whole, pw = ax.functionalize(model, output="logits", embedding="model.embed_tokens")
    x = _embeddings(f, p, batch=2, seq=8)
    t = torch.tensor([3, 7])
    comp = {nn.Linear: ax.rules.Epsilon(0.25, norm_scale=True)}  # a stabiliser scaled by the whole output's norm
    got = ax.lrp(f, p, x, t, composite=comp)
    want = ax.lrp(whole, pw, x, lambda o: o[:, -1].gather(1, t[:, None])[:, 0], composite=comp)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


class _Cast(nn.Module):
    """In-place ops that keep their operand's dtype (CodeGen adds a float32 mask into float64 scores in place)."""

    def __init__(self, case):
        super().__init__()
        self.a, self.b, self.case = nn.Linear(4, 4), nn.Linear(4, 2), case
        self.register_buffer("shift", torch.ones(4, dtype=torch.float64))

    def forward(self, x):
        h = self.a(x)
        if self.case == "narrow":  # float64 model, a float32 accumulator
            z = h.float()
            z += h
            h = z.to(x.dtype)
        else:  # float32 model, a float64 buffer added in place
            h += self.shift
        return self.b(h * torch.sigmoid(h))


@pytest.mark.parametrize("case", ["narrow", "wide_buffer"])
def test_in_place_ops_keep_their_dtype_in_programs(case):
    torch.manual_seed(0)
    m = _Cast(case).eval()
    dtype = D if case == "narrow" else torch.float32
    m = m.double() if case == "narrow" else m
    if case == "wide_buffer":
        m.shift = m.shift.double()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 4, dtype=dtype)
    assert gradient_program(f, p, (x,)) is not None
    got, want = ax.saliency(f, p, x, 0, abs=False), ax.saliency(eager(f), p, x, 0, abs=False)
    tol = 1e-12 if case == "narrow" else 1e-6
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    ax.lrp(f, p, x, 0)  # the rule methods' program too (a dtype clash crashed it)


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        h = h * torch.sigmoid(h)
        return self.b(h + 0.1 * torch.empty_like(h).normal_())


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.seen = nn.Linear(4, 4), nn.Linear(4, 2), []

    def forward(self, x):
        h = self.a(x)
        self.seen.append(h)
        return self.b(h * torch.sigmoid(h))


def test_a_trace_draws_nothing_and_a_model_writing_its_state_runs_as_it_is():
    torch.manual_seed(0)
    m = _Noisy().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 4, dtype=D)
    torch.manual_seed(123)
    got = ax.saliency(f, p, x, 0, abs=False)
    after = torch.rand(())
    torch.manual_seed(123)
    want = ax.saliency(eager(f), p, x, 0, abs=False)
    assert torch.equal(got, want) and torch.equal(after, torch.rand(()))
    m = _Recorder().double().eval()
    f, p = ax.functionalize(m)
    ax.saliency(f, p, x, 0)
    ax.saliency(f, p, x, 0)
    assert gradient_program(f, p, (x,)) is None  # its forward writes into the model: run as it is
    assert m.seen and all(type(t) is torch.Tensor for t in m.seen)  # the trace's fake tensors were taken back out


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.calls, self.last = nn.Linear(4, 2), 0, {}

    def forward(self, x):
        self.calls += 1
        self.last["x"] = x
        return self.a(x).tanh()


def test_a_trace_leaves_the_modules_attributes_as_they_were():
    m = _Counter().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 4, dtype=D)
    ax.lrp(f, p, x, 0)  # a rule method's trace: nothing written
    ax.deeplift(f, p, x, 0)
    assert m.calls == 0 and m.last == {} and f.shadow().calls == 0
    f(p, x)  # an eager call runs the forward (on the shadow copy, whose dict is the user's own)
    assert m.last["x"] is x


def test_traced_for_gradients_at_the_third_call_of_a_spec(monkeypatch):
    monkeypatch.setattr("attrax.rewrite.GRADIENT_PROGRAM_AFTER", 3)
    torch.manual_seed(0)
    f, p = ax.functionalize(_Mlp().double().eval())
    x = torch.randn(3, 5, dtype=D)
    for call in range(3):
        ax.saliency(f, p, x, 1)
        assert (len(f._programs) > 0) == (call == 2)  # the first two calls run the model; the third traces
    y = torch.randn(4, 5, dtype=D)  # another batch: its own count
    ax.saliency(f, p, y, 1)
    assert gradient_program(f, p, (y,), count=True) is None


_COEF = 0.044715


def _helper_gelu(h):  # a module-level helper a forward calls, reading a global
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + _COEF * torch.pow(h, 3.0))))


class _Helped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_helper_gelu(torch.sigmoid(self.a(x))))


def test_a_global_read_by_a_helper_the_forward_calls_is_part_of_the_fingerprint(monkeypatch):
    """A reviewer's find: programs were kept after a global read by a called helper changed."""
    torch.manual_seed(0)
    f, p = ax.functionalize(_Helped().double().eval())
    x = torch.randn(3, 4, dtype=D)
    first = ax.saliency(f, p, x, 1)
    before = ax.lrp(f, p, x, 1)
    monkeypatch.setattr(sys.modules[__name__], "_COEF", 0.5)
    got = ax.saliency(f, p, x, 1)
    assert not torch.allclose(got, first)
    torch.testing.assert_close(got, ax.saliency(eager(f), p, x, 1), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ax.lrp(f, p, x, 1), before)


_SCALE = 2.0


def _inner(h):
    return torch.tanh(h * _SCALE)


def _middle(h):
    return _inner(h) + 1.0


def _outer(h):
    return _middle(h) * 0.5


class _Chained(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return _outer(self.a(x))


def test_a_global_read_three_helpers_down_is_part_of_the_fingerprint(monkeypatch):
    """forward -> _outer -> _middle -> _inner reads _SCALE: a change was served stale (found in review)."""
    torch.manual_seed(0)
    f, p = ax.functionalize(_Chained().double().eval())
    x = torch.randn(3, 4, dtype=D)
    before = ax.lrp(f, p, x, 1)
    monkeypatch.setattr(sys.modules[__name__], "_SCALE", 5.0)
    after = ax.lrp(f, p, x, 1)
    assert not torch.allclose(after, before)
    fresh, q = ax.functionalize(f.module)
    torch.testing.assert_close(after, ax.lrp(fresh, q, x, 1))


class _Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.l1(x).cumsum(1)  # mixes positions: the selection cannot move past h
        return self.head(h * torch.tanh(h) + h)[:, -1]


@pytest.mark.parametrize("comp", ["excitation_backprop", "epsilon_plus", "attn_lrp", None])
def test_a_partial_move_keeps_an_elementwise_expression_of_one_tensor_whole(comp):
    """A reviewer's find: moved past h * tanh(h) + h but not past h, the expression read two selections of h and got
    other rules (excitation backprop: half the relevance). One selection per (tensor, row) now."""
    torch.manual_seed(0)
    m = _Cumsum().double().eval()
    f, p = ax.functionalize(m)

    class Whole(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = self.inner.l1(x).cumsum(1)
            return self.inner.head(h * torch.tanh(h) + h)

    fw, pw = ax.functionalize(Whole(m))
    x = torch.randn(2, 5, 4, dtype=D)
    c = getattr(ax.composites, comp)() if comp else None
    torch.testing.assert_close(ax.lrp(f, p, x, 1, composite=c), ax.lrp(fw, pw, x, lambda o: o[:, -1, 1], composite=c),
                               rtol=1e-10, atol=1e-13)


class _LostAdd(nn.Module):
    def __init__(self, write=True):
        super().__init__()
        self.l1, self.head, self.write = nn.Linear(4, 6), nn.Linear(6, 3), write

    def forward(self, x):
        h = self.l1(x)
        z = torch.zeros_like(h, dtype=torch.float32)  # built from h's shape only: folded to a constant
        if self.write:
            z += h  # a traced value written into it: what reads z afterwards is traced, not folded from the zeros
        q = z.to(h.dtype) + h
        return self.head(q * torch.sigmoid(q))[:, -1]


def test_an_in_place_write_into_a_folded_constant_is_traced_and_checked():
    """A reviewer's find: ``z.to(dtype)`` after ``z += h`` was folded from the zeros (the write lost: half the
    gradient, and a wrong published value in LRP). And a program that disagrees with the model is never used."""
    from attrax.rewrite import _agrees, program_spec, trace_program

    torch.manual_seed(0)
    m = _LostAdd().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 5, 4, dtype=D)
    assert gradient_program(f, p, (x,)) is not None
    for _ in range(3):
        torch.testing.assert_close(ax.saliency(f, p, x, 1, abs=False), ax.saliency(eager(f), p, x, 1, abs=False),
                                   rtol=1e-6, atol=1e-9)  # (z is float32: its rounding)
    out, _ = ax.value_and_attribution(ax.lrp, f, p, x, 1)
    torch.testing.assert_close(out.detach(), m(x), rtol=1e-6, atol=1e-9)
    # the check itself: this model's program against another model with the same parameters
    other = _LostAdd(write=False).double().eval()
    other.load_state_dict(m.state_dict())
    g, q = ax.functionalize(other)
    spec, batch = program_spec(f, p, (x,))
    assert _agrees(trace_program(f, spec, batch, native=True), f, p, (x,), None)
    assert not _agrees(trace_program(f, spec, batch, native=True), g, q, (x,), None)


@pytest.mark.parametrize("make, layer", [(gpt2, "transformer.wte"), (llama, "model.embed_tokens")])
def test_a_block_of_rows_moves_up_as_one_row_does(make, layer):
    """A slice of the output's positions (the rows ax.lm.generation explains) moves up like a select: the head and
    the last block's MLP run on those rows; values and gradients are the model's."""
    from attrax.rewrite import take_rows

    model = make()
    f, p = ax.functionalize(model, output="logits", embedding=layer)
    x = _embeddings(f, p, batch=2, seq=9)
    for block in ((3, 7), (0, 9), (8, 9)):
        program, _, selected = gradient_program(f, p, (x,), (1, block))
        assert selected and program.nodes[program.output].shape == (2, block[1] - block[0], 40)
        dense = [n for n in program.nodes if n.op == "call" and n.packet == "linear"]
        rows = block[1] - block[0]
        assert dense[-1].shape[1] == rows and dense[-2].shape[1] == rows  # head and the last MLP projection
        assert dense[0].shape[1] == 9  # the first block: every position
        a = x.detach().requires_grad_()
        b = x.detach().requires_grad_()
        from attrax.rewrite import forward
        got = forward(program, p, (a,))[program.output]
        want = take_rows(f(p, b), 1, block)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        cot = torch.randn(got.shape, dtype=D, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(torch.autograd.grad(got, a, cot)[0], torch.autograd.grad(want, b, cot)[0],
                                   rtol=1e-10, atol=1e-12)


def test_a_block_keeps_broadcast_operands_whole_and_stops_at_row_mixing():
    torch.manual_seed(0)
    m = _Rows().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 5, 4, dtype=D)
    program, _, selected = gradient_program(f, p, (x,), (1, (1, 4)))
    assert selected
    shapes = {n.module: n.shape for n in program.nodes if n.op == "call" and n.packet == "linear"}
    assert shapes == {"a": (2, 5, 6), "b": (2, 3, 6), "head": (2, 3, 5)}
    t = lambda o: o[:, 1:4].sum((1, 2))  # noqa: E731
    from attrax.rewrite import forward
    torch.testing.assert_close(forward(program, p, (x,))[program.output], f(p, x)[:, 1:4], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ax.saliency(f, p, x, t), ax.saliency(eager(f), p, x, t), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("strategy", ["auto", "shared", "vmap"])
def test_generation_on_the_block_of_rows_equals_separate_calls_and_keeps_programs_apart(strategy):
    """generation runs its rows through a model returning the explained positions only; a rule method run with
    that model (strategy="shared") traces it into a memo of its own, never the whole model's (a program of the
    whole output read at a relative position gave wrong rows), and later separate calls get the whole model."""
    model = llama()
    f, p = ax.functionalize(model, output="logits", embedding="model.embed_tokens")
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = f.embed(p, ids)
    start = 5
    comp = ax.composites.attn_lrp()
    for method, kw in ((ax.integrated_gradients, {"n_steps": 4}), (ax.lrp, {"composite": comp})):
        sep = lambda: torch.stack([method(f, p, x, ax.lm.next_token(ids[:, start + k], start + k - 1), **kw).sum(-1)  # noqa: E731
                                   for k in range(4)], 1)
        before = sep()
        for _ in range(3):  # the third call traces the programs
            got = ax.lm.generation(method, f, p, x, ids[:, start:], start=start, strategy=strategy, **kw)
            torch.testing.assert_close(got, before, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sep(), before, rtol=1e-9, atol=1e-12)
        assert f(p, x).shape == (2, 9, 40)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # (torch's fake-tensor
# conversion of the module's own real parameters, a warning it means to suppress)
def test_a_trace_of_a_plain_function_leaves_the_modules_it_calls_as_they_were():
    """A functionalized plain function calling a recording module: the trace's FakeTensor stayed in the module's
    list (the shadow covers functionalized modules only; found in review)."""
    m = _Recorder().double().eval()

    def fn(p, x):
        return m(x)

    f, p = ax.functionalize(fn)
    x = torch.randn(3, 4, dtype=D)
    ax.lrp(f, p, x, 0)
    ax.deeplift(f, p, x, 0)
    assert all(type(t) is torch.Tensor for t in m.seen)
