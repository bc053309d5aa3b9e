"""``additional_forward_args`` (API §9): masks and ids passed after x, never attributed; a padded batch
equals each sequence alone, and padded positions get exactly zero."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import attrax as ax

D = torch.float64
T = 7


class Encoder(nn.Module):
    """nn.TransformerEncoder with a key padding mask, pooled over real tokens."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x, keep):
        h = self.enc(x, src_key_padding_mask=keep == 0)
        return self.head((h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))


class LM(nn.Module):
    """An HF causal LM from embeddings, with a 4-D additive mask and position ids; next-token logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, e, mask4, positions):
        return self.model(inputs_embeds=e, attention_mask=mask4, position_ids=positions).logits[:, -1]


def mask4d(keep: torch.Tensor) -> torch.Tensor:
    b, t = keep.shape
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & keep.bool()[:, None, None, :]
    allowed |= torch.eye(t, dtype=torch.bool)  # a pad attends to itself: no fully masked row
    return torch.zeros(b, 1, t, t, dtype=D).masked_fill(~allowed, torch.finfo(D).min)


def lm(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=30, n_positions=16)
        return LM(transformers.GPT2LMHeadModel(cfg))
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=24, vocab_size=30, max_position_embeddings=16)
    return LM(transformers.LlamaForCausalLM(cfg))


METHODS = {
    "deeplift": lambda f, p, x, t, args, n: ax.deeplift(f, p, x, t, additional_forward_args=args),
    "integrated_gradients": lambda f, p, x, t, args, n: ax.integrated_gradients(
        f, p, x, t, n_steps=6, chunk_size=4, additional_forward_args=args),
    "input_x_gradient": lambda f, p, x, t, args, n: ax.input_x_gradient(f, p, x, t, additional_forward_args=args),
    "feature_ablation": lambda f, p, x, t, args, n: ax.feature_ablation(
        f, p, x, t, feature_mask=torch.arange(n).view(1, n, 1).expand(x.shape), chunk_size=3,
        additional_forward_args=args),
    # stdev 0: n_samples copies folded into the batch, each must see its own sequence's mask
    "smoothgrad": lambda f, p, x, t, args, n: ax.smoothgrad(f, p, x, t, n_samples=3, stdev=0.0,
                                                            additional_forward_args=args),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_left_padded_batch_equals_each_sequence_alone(name: str, method: str) -> None:
    f, p = ax.functionalize(lm(name).double().eval())
    g = torch.Generator().manual_seed(2)
    e = torch.randn(2, T, 16, generator=g, dtype=D)
    keep = torch.ones(2, T, dtype=torch.long)
    keep[1, :3] = 0  # the second sequence has 4 tokens, left-padded
    positions = (keep.cumsum(-1) - 1).clamp(min=0)
    together = METHODS[method](f, p, e, 5, (mask4d(keep), positions), T)
    alone = METHODS[method](f, p, e[1:, 3:], 5, (mask4d(keep[1:, 3:]), positions[1:, 3:]), T - 3)
    if method == "smoothgrad":
        plain = ax.gradient(f, p, e, 5, additional_forward_args=(mask4d(keep), positions))
        torch.testing.assert_close(together, plain, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(together[1:, 3:], alone, rtol=1e-6, atol=1e-9)
    if method != "feature_ablation":
        assert torch.equal(together[1, :3], torch.zeros_like(together[1, :3]))  # pads: exactly zero
    else:
        assert together[1, :3].abs().max() < 1e-12


def test_key_padding_mask_on_a_torch_encoder() -> None:
    torch.manual_seed(1)
    f, p = ax.functionalize(Encoder().double().eval())
    g = torch.Generator().manual_seed(3)
    x, b = torch.randn(3, T, 16, generator=g, dtype=D), torch.randn(3, T, 16, generator=g, dtype=D)
    keep = torch.ones(3, T, dtype=D)
    keep[0, 5:], keep[2, 2:] = 0, 0  # right padding
    attr = ax.deeplift(f, p, x, 1, baseline=b, additional_forward_args=(keep,))
    with torch.no_grad():
        delta = f(p, x, keep)[:, 1] - f(p, b, keep)[:, 1]
    torch.testing.assert_close(attr.flatten(1).sum(1), delta, rtol=1e-9, atol=1e-12)
    assert torch.equal(attr[0, 5:], torch.zeros_like(attr[0, 5:])) and torch.equal(attr[2, 2:], torch.zeros_like(attr[2, 2:]))
    alone = ax.deeplift(f, p, x[2:, :2], 1, baseline=b[2:, :2], additional_forward_args=(keep[2:, :2],))
    torch.testing.assert_close(attr[2:, :2], alone, rtol=1e-9, atol=1e-12)
    lrp = ax.guided_backprop(f, p, x, 1, additional_forward_args=(keep,))
    assert torch.equal(lrp[0, 5:], torch.zeros_like(lrp[0, 5:]))


def test_forward_args_are_never_attributed_and_user_tensors_unchanged() -> None:
    f, p = ax.functionalize(Encoder().double().eval())
    x = torch.randn(2, T, 16, dtype=D)
    keep = torch.ones(2, T, dtype=D)
    before = keep.clone()
    out = ax.integrated_gradients(f, p, x, 0, n_steps=4, additional_forward_args=(keep,))
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    assert torch.equal(keep, before)


class _MaskedByArgument(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, m: Any) -> torch.Tensor:
        m = m["masks"][0] if isinstance(m, dict) else m
        return self.l(x.masked_fill(m.logical_not(), 0.0))  # logical_not(m) is folded into the program


def test_grad_through_a_rule_method_with_bound_tensors() -> None:
    # the bound arguments' digest runs outside functorch's levels (under grad, detach() came back wrapped)
    torch.manual_seed(0)
    f, p = ax.functionalize(_MaskedByArgument().double().eval())
    x, m = torch.randn(2, 4, dtype=torch.float64), torch.tensor([True, False, True, True])
    w = {"l.weight": p["l.weight"].detach()}

    def loss(w: dict) -> torch.Tensor:
        return (ax.deeplift(f, {**p, **w}, x, 1, additional_forward_args=(m,)) ** 2).sum()

    g = torch.func.grad(loss)(w)["l.weight"]
    step = 1e-6
    for i, j in ((1, 0), (1, 3), (0, 2)):
        e = torch.zeros_like(w["l.weight"])
        e[i, j] = step
        with torch.no_grad():
            fd = (loss({"l.weight": w["l.weight"] + e}) - loss({"l.weight": w["l.weight"] - e})) / (2 * step)
        assert abs(float(g[i, j].detach() - fd)) < 1e-6


def test_a_nested_bound_tensor_edited_through_data_is_seen() -> None:
    torch.manual_seed(0)
    f, p = ax.functionalize(_MaskedByArgument().eval())
    x, m = torch.randn(2, 4), torch.tensor([True, False, False, True])
    bound = ({"masks": [m]},)  # the same containers each call (new ones would be new keys anyway)
    first = ax.deeplift(f, p, x, 1, additional_forward_args=bound)
    m.data.logical_not_()  # no version bump, two levels down
    second = ax.deeplift(f, p, x, 1, additional_forward_args=bound)
    g, q = ax.functionalize(f.module)
    torch.testing.assert_close(second, ax.deeplift(g, q, x, 1, additional_forward_args=({"masks": [m.clone()]},)),
                               rtol=0, atol=0)
    assert not torch.equal(first, second)


# ------------------------------------------------------------------ compile (API §5 with API §9)


def _tiny_gpt2() -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    f, p = ax.functionalize(model, output="logits", embedding="transformer.wte")
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    return f, p, f.embed(p, ids).detach(), mask


@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated")  # (dynamo on HF)
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_fullgraph_compile_with_a_mask_input_and_an_embedding_model(method: str) -> None:
    """A dict mask crashed compiled code (the bound model took a lock), and so did any embedding= model (its shadow
    read a context variable). The mask is an input of the compiled function: a new mask needs no recompile."""
    f, p, e, mask = _tiny_gpt2()
    m = getattr(ax, method)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    explain = torch.compile(lambda e, mask: m(f, p, e, (5, 3), additional_forward_args={"attention_mask": mask}),
                            fullgraph=True, backend=counter)
    other = torch.ones_like(mask)
    other[0, :3] = 0
    for k in (mask, other):
        want = m(f, p, e, (5, 3), additional_forward_args={"attention_mask": k})
        torch.testing.assert_close(explain(e, k), want, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1  # a new mask is a new input, not a recompile
    assert not (m(f, p, e, (5, 3), additional_forward_args={"attention_mask": mask}) - want).abs().max() < 1e-6
    # compiled code runs the module itself (dynamo's guards see a change), never leaving the injection behind
    f.module.transformer.ln_f.eps = 0.5
    torch.testing.assert_close(explain(e, mask), m(f, p, e, (5, 3), additional_forward_args={"attention_mask": mask}),
                               rtol=1e-10, atol=1e-12)
    assert "forward" not in f.module.transformer.wte.__dict__


@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated")  # (dynamo on HF)
@pytest.mark.parametrize("method", ["lrp", "deeplift"])
def test_ax_compile_binds_forward_args_for_rule_methods(method: str) -> None:
    """Rule methods trace the model once, at compile time: ax.compile binds the mask before compiling (inside
    compiled code the bound model was no object that step could read), and follows the mask edited in place."""
    f, p, e, mask = _tiny_gpt2()
    m = getattr(ax, method)
    kw: dict[str, Any] = {"composite": ax.composites.attn_lrp()} if method == "lrp" else {}
    afa = {"attention_mask": mask}
    explain = ax.compile(m, f, p, backend="eager", additional_forward_args=afa, **kw)
    for target in ((5, 3), (4, 7)):
        torch.testing.assert_close(explain(e, target), m(f, p, e, target, additional_forward_args=afa, **kw),
                                   rtol=1e-10, atol=1e-12)
    before = explain(e, (5, 3))
    mask[0, 0] = 0
    after = explain(e, (5, 3))
    torch.testing.assert_close(after, m(f, p, e, (5, 3), additional_forward_args=afa, **kw), rtol=1e-10, atol=1e-12)
    assert (after - before).abs().max() > 1e-6
    with pytest.raises(Exception, match="ax.compile"):  # the raw form says what to use instead
        torch.compile(lambda e: m(f, p, e, (5, 3), additional_forward_args=afa, **kw), fullgraph=True,
                      backend="eager")(e)


@pytest.mark.parametrize("method", ["feature_ablation", "occlusion", "shapley_sampling"])
def test_perturbation_methods_compile(method: str) -> None:
    """The progress bar's context variable stopped every perturbation method in compiled code."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(5, 4, dtype=D)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=D)
    m = getattr(ax, method)
    kw: dict[str, Any] = {"window": (2,)} if method == "occlusion" else {}
    explain = torch.compile(lambda x, t: m(f, p, x, t, **kw), fullgraph=True, backend="eager")
    torch.manual_seed(3)
    got = explain(x, torch.tensor(1))
    torch.manual_seed(3)
    torch.testing.assert_close(got, m(f, p, x, 1, **kw), rtol=1e-10, atol=1e-12)

    def masked(p, x, keep):
        return f(p, x * keep[:, None])

    fm, _ = ax.functionalize(masked)
    bound = ax.compile(m, fm, p, backend="eager", additional_forward_args=(keep,), **kw)
    torch.manual_seed(3)
    got = bound(x, 1)
    torch.manual_seed(3)
    torch.testing.assert_close(got, m(fm, p, x, 1, additional_forward_args=(keep,), **kw), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------- export (API §6 with API §9)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, mask=None, scale=1.0):
        return self.l2(torch.tanh(self.l1(x)) * scale * mask[:, None])


@pytest.mark.parametrize("form", ["tuple", "dict"])
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "smoothgrad"])
def test_export_takes_per_sample_forward_args_as_inputs(method: str, form: str) -> None:
    """Per-sample tensors become the program's last inputs (dynamic batch); other values are constants. Before,
    export failed in every form ('.numpy() is not supported for tensor subclasses')."""
    torch.manual_seed(0)
    f, p = ax.functionalize(Gated().double().eval())
    x, keep = torch.randn(5, 4, dtype=D), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5], dtype=D)

    def args(k: torch.Tensor) -> Any:
        return (k, 2.0) if form == "tuple" else {"mask": k, "scale": 2.0}

    m = getattr(ax, method)
    prog = ax.export(m, f, p, x, 1, additional_forward_args=args(keep))
    x2, keep2 = torch.randn(3, 4, dtype=D), torch.tensor([0.0, 1.0, 0.25], dtype=D)
    seed = (torch.tensor(4),) if method == "smoothgrad" else ()
    kw = {"noise": ax.serving.seeded_normal(4, (25, 3, 4), dtype=D)} if method == "smoothgrad" else {}
    got = prog.module()(x2, torch.full((3,), 2), *seed, keep2)
    torch.testing.assert_close(got, m(f, p, x2, 2, additional_forward_args=args(keep2), **kw), rtol=1e-10, atol=1e-12)


def test_export_with_a_4d_mask_on_llama_and_the_2d_mask_hint() -> None:
    model = lm("llama").double().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(2, T, 16, dtype=D)
    keep = torch.ones(2, T, dtype=D)
    keep[0, :2] = 0
    positions = (keep.cumsum(1) - 1).clamp(min=0).long()
    prog = ax.export(ax.integrated_gradients, f, p, x, 3, n_steps=4, additional_forward_args=(mask4d(keep), positions))
    keep2 = torch.ones(3, T, dtype=D)
    keep2[2, :4] = 0
    args2 = (mask4d(keep2), (keep2.cumsum(1) - 1).clamp(min=0).long())
    x2 = torch.randn(3, T, 16, dtype=D)
    torch.testing.assert_close(prog.module()(x2, torch.full((3,), 5), *args2),
                               ax.integrated_gradients(f, p, x2, 5, n_steps=4, additional_forward_args=args2),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="program of its own"):  # rule methods bake the mask: a clear refusal
        ax.export(ax.deeplift, f, p, x, 3, additional_forward_args=(mask4d(keep), positions))
    hf = model.model
    g, q = ax.functionalize(hf, output=lambda o: o.logits[:, -1], embedding="model.embed_tokens")
    ids = torch.randint(0, 30, (2, T))
    with pytest.raises(ValueError, match="4-D additive mask"):
        ax.export(ax.saliency, g, q, g.embed(q, ids).detach(), 3,
                  additional_forward_args={"attention_mask": keep.long()})


def test_vmap_over_bound_tensors_of_a_rule_method_says_what_to_do() -> None:
    """It said "model_fn runs torch.vmap itself", which the user's model does not."""
    f, p = ax.functionalize(Gated().double().eval())
    x, keep = torch.randn(5, 4, dtype=D), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5], dtype=D)
    for args in (lambda k: (k[None],), lambda k: {"mask": k[None]}):
        with pytest.raises(TypeError, match="need no vmap: pass the whole batch"):
            torch.func.vmap(lambda xi, ki: ax.lrp(f, p, xi[None], 1, additional_forward_args=args(ki))[0])(x, keep)
    want = torch.stack([ax.lrp(f, p, x[i:i + 1], 1, additional_forward_args=(keep[i:i + 1],))[0] for i in range(5)])
    torch.testing.assert_close(ax.lrp(f, p, x, 1, additional_forward_args=(keep,)), want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------- review findings (stop 25, outside testing)


class Weighted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, w, mask):
        return self.l2(torch.tanh(self.l1(x)) * w * mask[:, None])


def test_ax_compile_binds_for_each_calls_batch() -> None:
    """ax.compile bound the args once, sizing the batch by their first tensor: a shared (8,) weight before a (5,)
    mask was cut or tiled as if per-sample, and a call on fewer rows silently used mask[:n]. Now the args are
    bound for each call's x (as eagerly), batch_size= with per-sample args is refused, and values alone work."""
    torch.manual_seed(0)
    f, p = ax.functionalize(Weighted().double().eval())
    x, w = torch.randn(5, 4, dtype=D), torch.rand(8, dtype=D)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5], dtype=D)
    for m in (ax.saliency, ax.integrated_gradients, ax.deeplift):
        explain = ax.compile(m, f, p, backend="eager", additional_forward_args=(w, keep))
        torch.testing.assert_close(explain(x, 1), m(f, p, x, 1, additional_forward_args=(w, keep)), rtol=1e-10,
                                   atol=1e-12)
        with pytest.raises(Exception):  # the mask belongs to 5 rows: like the eager call, no silent mask[:3]
            explain(x[:3], 1)
    with pytest.raises(ValueError, match="batch_size=2 cuts x into pieces"):
        ax.compile(ax.saliency, f, p, batch_size=2, additional_forward_args=(w, keep))(x, 1)
    g, q = ax.functionalize(Gated().double().eval())  # shared values only: pieces are fine
    explain = ax.compile(ax.saliency, g, q, backend="eager", batch_size=2, additional_forward_args=(
        torch.ones(1, dtype=D), 3.0))
    torch.testing.assert_close(explain(x, 1), ax.saliency(g, q, x, 1, additional_forward_args=(torch.ones(1, dtype=D),
                                                                                                 3.0)),
                               rtol=1e-10, atol=1e-12)
    g, q = ax.functionalize(Gated().double().eval())
    explain = ax.compile(ax.saliency, g, q, backend="eager", additional_forward_args={"mask": torch.ones(5, dtype=D),
                                                                                       "scale": 2.0})
    torch.testing.assert_close(explain(x, 1), ax.saliency(g, q, x, 1, additional_forward_args={
        "mask": torch.ones(5, dtype=D), "scale": 2.0}), rtol=1e-10, atol=1e-12)
    bl = torch.randn(3, 4, dtype=D)  # deeplift_shap ran its program, traced at the bound batch, on folded rows
    explain = ax.compile(ax.deeplift_shap, f, p, backend="eager", baselines=bl, additional_forward_args=(w, keep))
    torch.testing.assert_close(explain(x, 1), ax.deeplift_shap(f, p, x, 1, bl, additional_forward_args=(w, keep)),
                               rtol=1e-10, atol=1e-12)


def test_export_edges_from_review() -> None:
    """A per-sample argument with a dim equal to the example batch broke the dynamic batch (the trace size avoided
    x's dims only); a rule method with shared values only was refused as if they were per-sample."""
    torch.manual_seed(0)
    f, p = ax.functionalize(Weighted().double().eval())
    x, w, keep = torch.randn(3, 4, dtype=D), torch.rand(8, dtype=D), torch.tensor([1.0, 0.0, 0.5], dtype=D)
    prog = ax.export(ax.saliency, f, p, x, 1, additional_forward_args=(w, keep))  # trace size must avoid 8 too
    x5, k5 = torch.randn(5, 4, dtype=D), torch.rand(5, dtype=D)
    torch.testing.assert_close(prog.module()(x5, torch.full((5,), 1), k5),
                               ax.saliency(f, p, x5, 1, additional_forward_args=(w, k5)), rtol=1e-10, atol=1e-12)
    g, q = ax.functionalize(Gated().double().eval())
    prog = ax.export(ax.deeplift, g, q, x, 1, additional_forward_args={"mask": torch.ones(1, dtype=D),
                                                                        "scale": 2.0})
    torch.testing.assert_close(prog.module()(x5, torch.full((5,), 2)), ax.deeplift(
        g, q, x5, 2, additional_forward_args={"mask": torch.ones(1, dtype=D), "scale": 2.0}), rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="deeplift: per-sample additional_forward_args"):
        ax.export(ax.deeplift, g, q, x, 1, additional_forward_args=(keep,))


@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated")
def test_embedding_model_compiles_under_aot_autograd_and_smoothgrad_fullgraph() -> None:
    """The injected embedding tensor, kept on the model past the call, escaped the graph ("Cannot access storage
    of TensorWrapper" under aot_eager and inductor); smoothgrad set a context variable in compiled code."""
    f, p, e, mask = _tiny_gpt2()
    explain = ax.compile(ax.saliency, f, p, backend="aot_eager")
    torch.testing.assert_close(explain(e, (5, 3)), ax.saliency(f, p, e, (5, 3)), rtol=1e-10, atol=1e-12)
    assert f._injected.value is None
    # compiled code never touches the holder eager calls (other threads) inject through: it cleared it under
    # them ("layer_norm(): argument 'input' must be Tensor, not NoneType" in 1 of ~1000 eager calls)
    sentinel = object()
    f._injected.value = sentinel
    explain(e, (4, 3))
    assert f._injected.value is sentinel
    f._injected.value = None
    sg = torch.compile(lambda e, noise: ax.smoothgrad(f, p, e, (5, 3), noise=noise, stdev=0.1, n_samples=2),
                       fullgraph=True, backend="eager")
    noise = torch.randn(2, *e.shape, dtype=D)
    torch.testing.assert_close(sg(e, noise), ax.smoothgrad(f, p, e, (5, 3), noise=noise, stdev=0.1, n_samples=2),
                               rtol=1e-10, atol=1e-12)


class NestedArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, masks):
        return self.l2(torch.tanh(self.l1(x)) * masks["a"][:, None] * masks["b"][0][:, None])


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift", "feature_ablation"])
def test_per_sample_tensors_nested_in_containers_follow_the_batch(method: str) -> None:
    """Only top-level tensors were repeated where steps fold into the batch: IG failed with "15 vs 5"."""
    torch.manual_seed(0)
    f, p = ax.functionalize(NestedArgs().double().eval())
    x, a, b = torch.randn(5, 4, dtype=D), torch.rand(5, dtype=D), torch.rand(5, dtype=D)
    m = getattr(ax, method)
    got = m(f, p, x, 1, additional_forward_args=({"a": a, "b": [b]},))
    want = torch.cat([m(f, p, x[i:i + 1], 1, additional_forward_args=({"a": a[i:i + 1], "b": [b[i:i + 1]]},))
                      for i in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_shared_forward_args_keep_one_dynamic_graph() -> None:
    """Shared values only (no tensor with the batch's rows): one bound model and one graph for every batch size, as
    a plain torch.compile gets (it was one graph per size)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    f, p = ax.functionalize(Gated().double().eval())
    args = (torch.full((1,), 0.5, dtype=D), 3.0)
    for method in (ax.saliency, ax.lrp):
        counter = CompileCounterWithBackend("eager")
        explain = ax.compile(method, f, p, backend=counter, dynamic=True, additional_forward_args=args)
        for batch in (5, 3, 7, 5):
            x = torch.randn(batch, 4, dtype=D)
            torch.testing.assert_close(explain(x, 1), method(f, p, x, 1, additional_forward_args=args), rtol=1e-10,
                                       atol=1e-12)
        assert counter.frame_count == 1, method.__name__
