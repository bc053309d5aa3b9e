"""Language-model targets and generation attribution (issue 17.3, 17.4)."""

from __future__ import annotations

import warnings

import pytest
import torch

import attrax as ax

transformers = pytest.importorskip("transformers")
D = torch.float64


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=30, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    f, p = ax.functionalize(model, output="logits", embedding="transformer.wte")
    ids = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(1))
    return model, f, p, ids, f.embed(p, ids)


def test_targets_select_what_they_say(gpt2) -> None:
    model, f, p, ids, e = gpt2
    with torch.no_grad():
        out = f(p, e)
    logp = torch.log_softmax(out, -1)
    tok = torch.tensor([3, 7])
    torch.testing.assert_close(ax.targets.next_token(5)(out), out[:, -1, 5])
    torch.testing.assert_close(ax.targets.next_token(tok, 4)(out), out[torch.arange(2), 4, tok])
    torch.testing.assert_close(ax.targets.next_token(tok, torch.tensor([2, 6]), log_prob=True)(out),
                               logp[torch.arange(2), torch.tensor([2, 6]), tok])
    torch.testing.assert_close(ax.targets.contrast(3, 9, -2)(out), out[:, -2, 3] - out[:, -2, 9])
    cont = ids[:, 6:9]
    want = sum(logp[torch.arange(2), 5 + k, cont[:, k]] for k in range(3))
    torch.testing.assert_close(ax.targets.continuation(cont, 6)(out), want)
    with pytest.raises(ValueError, match=r"logits of shape \(B, T, V\)"):
        ax.targets.next_token(1)(out[:, -1])


def test_contrast_target_conserves_lrp_relevance_and_matches_ig_completeness(gpt2) -> None:
    model, f, p, ids, e = gpt2
    target = ax.targets.contrast(3, 9)
    ig = ax.integrated_gradients(f, p, e, target, n_steps=64)
    with torch.no_grad():
        span = target(f(p, e)) - target(f(p, torch.zeros_like(e)))
    torch.testing.assert_close(ig.flatten(1).sum(1), span, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("method, kw", [(ax.integrated_gradients, {"n_steps": 8}), (ax.deeplift, {}),
                                        (ax.input_x_gradient, {})])
def test_generation_rows_equal_separate_calls(gpt2, method, kw) -> None:
    model, f, p, ids, e = gpt2
    start = 4
    matrix = ax.lm.generation(method, f, p, e, ids[:, start:], start=start, chunk_size=3, **kw)
    assert matrix.shape == (2, 6, 10)
    for k in range(6):
        row = method(f, p, e, ax.targets.next_token(ids[:, start + k], start + k - 1), **kw).sum(-1)
        torch.testing.assert_close(matrix[:, k], row, rtol=1e-6, atol=1e-10)
        assert torch.equal(matrix[:, k, start + k:], torch.zeros_like(matrix[:, k, start + k:]))  # causal


@pytest.mark.parametrize("strategy", ["auto", "shared", "vmap"])
@pytest.mark.parametrize("method, kw", [(ax.integrated_gradients, {"n_steps": 8}),
                                        (ax.lrp, {"composite": ax.composites.attn_lrp()})])
def test_generation_rows_equal_separate_calls_for_ig_and_attn_lrp(gpt2, strategy, method, kw) -> None:
    """Issue 17 acceptance 3: row k is the separate call with target token k at its position (1e-6)."""
    model, f, p, ids, e = gpt2
    start = 5
    matrix = ax.lm.generation(method, f, p, e, ids[:, start:], start=start, strategy=strategy, **kw)
    for k in range(ids.shape[1] - start):
        row = method(f, p, e, ax.targets.next_token(ids[:, start + k], start + k - 1), **kw).sum(-1)
        torch.testing.assert_close(matrix[:, k], row, rtol=1e-6, atol=1e-10)


def test_shared_generation_runs_the_forward_once(gpt2) -> None:
    """IG's path points are evaluated once for all rows; the rows are the separate calls' bitwise."""
    model, f, p, ids, e = gpt2
    calls = []

    def fn(params, x):
        calls.append(x.shape[0])
        return f(params, x)

    start = 4
    matrix = ax.lm.generation(ax.integrated_gradients, fn, p, e, ids[:, start:], start=start, n_steps=8)
    assert calls == [1, 2 * 8]  # the method's probe of the output on one sample, then the 8 path points
    for k in range(ids.shape[1] - start):
        # the same model function: bitwise (a FunctionalModel's separate calls compute the head at the target's
        # position only, rewrite.gradient_program: equal to rounding, test above)
        row = ax.integrated_gradients(lambda pp, x: f(pp, x), p, e, ax.targets.next_token(ids[:, start + k], start + k - 1),
                                      n_steps=8)
        assert torch.equal(matrix[:, k], row.sum(-1))


def test_shared_generation_with_a_mask_and_log_probs(gpt2) -> None:
    """Bound keyword arguments (the attention mask) are part of what a kept forward must match."""
    model, f, p, ids, e = gpt2
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding of the second sequence
    kw = {"n_steps": 8, "additional_forward_args": {"attention_mask": mask}}
    start = 6
    matrix = ax.lm.generation(ax.integrated_gradients, f, p, e, ids[:, start:], start=start, log_prob=True,
                              strategy="shared", **kw)
    for k in range(ids.shape[1] - start):
        target = ax.targets.next_token(ids[:, start + k], start + k - 1, log_prob=True)
        row = ax.integrated_gradients(f, p, e, target, **kw).sum(-1)
        torch.testing.assert_close(matrix[:, k], row, rtol=1e-6, atol=1e-10)
    assert torch.equal(matrix[1, :, :2], torch.zeros_like(matrix[1, :, :2]))  # pads get exactly 0


def test_shared_generation_does_not_reuse_a_forward_at_other_inputs(gpt2) -> None:
    """A method whose inputs differ between rows (a random baseline per call) gets fresh forwards."""
    model, f, p, ids, e = gpt2
    gen = torch.Generator().manual_seed(3)
    baselines = []

    def method(model_fn, params, x, target, **kw):
        b = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        baselines.append(b)
        return ax.integrated_gradients(model_fn, params, x, target, baseline=b, n_steps=4)

    start = 7
    matrix = ax.lm.generation(method, f, p, e, ids[:, start:], start=start, strategy="shared")
    for k in range(ids.shape[1] - start):
        target = ax.targets.next_token(ids[:, start + k], start + k - 1)
        row = ax.integrated_gradients(f, p, e, target, baseline=baselines[k], n_steps=4).sum(-1)
        torch.testing.assert_close(matrix[:, k], row, rtol=1e-6, atol=1e-10)


def test_generation_checks_its_arguments(gpt2) -> None:
    model, f, p, ids, e = gpt2
    with pytest.raises(ValueError, match="does not fit"):
        ax.lm.generation(ax.gradient, f, p, e, ids, start=4)
    with pytest.raises(ValueError, match="start must be"):
        ax.lm.generation(ax.gradient, f, p, e, ids[:, :2], start=0)
    with pytest.raises(ValueError, match="strategy must be"):
        ax.lm.generation(ax.gradient, f, p, e, ids[:, 4:], start=4, strategy="loop")


def test_shared_generation_does_not_match_an_input_edited_in_place():
    """A method that reuses its input buffer (edits it in place between two model calls) must not get the
    first call's kept forward back: the kept inputs alias the caller's tensors (found in review)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=4, vocab_size=30,
                                                              n_positions=32)).double().eval()
    f, p = ax.functionalize(m, output="logits", embedding="transformer.wte")
    ids = torch.randint(0, 30, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e = f.embed(p, ids)

    def method(fn, params, x, target):
        xx = x.clone()
        ax.input_x_gradient(fn, params, xx, target)
        xx.mul_(0.5)
        return ax.input_x_gradient(fn, params, xx, target)

    for strategy in ("shared", "auto"):
        g = ax.lm.generation(method, f, p, e, ids[:, 5:], start=5, strategy=strategy)
        sep = method(f, p, e, ax.lm.next_token(ids[:, 5], 4)).sum(-1)
        torch.testing.assert_close(g[:, 0], sep)


def test_vmapped_generation_runs_sampling_methods():
    """strategy="vmap" draws per row (randomness="different"); the default vmap mode refused any method that
    samples (found in review)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=4, vocab_size=30,
                                                              n_positions=32)).eval()
    f, p = ax.functionalize(m, output="logits", embedding="transformer.wte")
    ids = torch.randint(0, 30, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e = f.embed(p, ids)
    g = ax.lm.generation(ax.gradient_shap, f, p, e, ids[:, 5:], start=5, strategy="vmap",
                         baselines=torch.zeros(2, *e.shape[1:]), n_samples=3)
    assert g.shape == (1, 3, 8) and torch.isfinite(g).all()


# ---------------------------------------------------------------- generation's block of rows: every kind of model_fn

_W = torch.randn(4, 7, dtype=D, generator=torch.Generator().manual_seed(0))
_M = torch.randn(4, 4, dtype=D, generator=torch.Generator().manual_seed(1))


def _causal_lm(p, e):
    return torch.tanh(torch.cumsum(e, 1) @ _M) @ _W


class _CausalLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.m, self.o = torch.nn.Linear(4, 4), torch.nn.Linear(4, 7)

    def forward(self, e):
        return self.o(torch.tanh(self.m(torch.cumsum(e, 1))))


def _separate(method, fn, p, e, cont, start):
    return torch.stack([method(fn, p, e, ax.lm.next_token(cont[:, k], start + k - 1)).sum(-1)
                        for k in range(cont.shape[1])], 1)


@pytest.mark.parametrize("method", [ax.saliency, ax.integrated_gradients, ax.lrp])
@pytest.mark.parametrize("kind", ["functionalized_function", "plain_function", "module"])
def test_generation_rows_for_every_kind_of_model_fn(method, kind):
    """A functionalized plain function's calls skipped the sliced forward (its __call__ bypassed run) while the rows'
    targets moved to relative positions: row 0 was wrong for every method (found in review)."""
    torch.manual_seed(0)
    fn, p = {"functionalized_function": lambda: ax.functionalize(_causal_lm), "plain_function": lambda: (_causal_lm, {}),
             "module": lambda: ax.functionalize(_CausalLM().double().eval())}[kind]()
    e = torch.randn(2, 5, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    cont, start = torch.tensor([[3, 1], [0, 6]]), 3
    want = _separate(method, fn, p, e, cont, start)
    for strategy in ("auto", "shared", "vmap"):
        got = ax.lm.generation(method, fn, p, e, cont, start=start, strategy=strategy)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert fn(p, e).shape == (2, 5, 7)


def test_generation_under_compile_and_inside_value_and_attribution():
    """Compiled, a FunctionalModel of a plain module skipped the sliced forward (row 0 wrong); inside
    value_and_attribution the output returned was the explained rows only, not the model's (found in review)."""
    torch.manual_seed(0)
    fn, p = ax.functionalize(_CausalLM().double().eval())
    e = torch.randn(1, 5, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    cont, start = torch.tensor([[3, 1]]), 3
    want = _separate(ax.saliency, fn, p, e, cont, start)
    compiled = torch.compile(lambda e: ax.lm.generation(ax.saliency, fn, p, e, cont, start=start), backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (dynamo's own warnings about .grad of non-leaf tensors while it traces)
        torch.testing.assert_close(compiled(e), want, rtol=1e-10, atol=1e-12)
    out, attr = ax.value_and_attribution(lambda f, q, x, t: ax.lm.generation(ax.input_x_gradient, f, q, x, cont,
                                                                             start=start), fn, p, e, None)
    torch.testing.assert_close(out, fn(p, e))
    torch.testing.assert_close(attr, _separate(ax.input_x_gradient, fn, p, e, cont, start), rtol=1e-10, atol=1e-12)


def test_generation_start_may_be_a_numpy_or_tensor_integer():
    import numpy as np

    fn, p = ax.functionalize(_causal_lm)
    e = torch.randn(1, 5, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    cont = torch.tensor([[3, 1]])
    want = ax.lm.generation(ax.saliency, fn, p, e, cont, start=3)
    for start in (np.int64(3), torch.tensor(3)):
        torch.testing.assert_close(ax.lm.generation(ax.saliency, fn, p, e, cont, start=start), want)
    for bad in (True, torch.tensor(3.0), np.float64(3.0)):
        with pytest.raises(ValueError, match="start must be an int"):
            ax.lm.generation(ax.saliency, fn, p, e, cont, start=bad)


def test_keyword_forward_args_on_a_functionalized_function():
    """A dict additional_forward_args on ax.functionalize(<function>) crashed ('NoneType' has no _parameters)."""
    def f(p, x, scale=None):
        return (x * scale).tanh() @ _M

    fn, p = ax.functionalize(f)
    x = torch.randn(3, 4, dtype=D)
    scale = torch.rand(3, 4, dtype=D) + 0.5
    got = ax.integrated_gradients(fn, p, x, 1, additional_forward_args={"scale": scale}, n_steps=8)
    want = ax.integrated_gradients(lambda q, x: f(q, x, scale=scale.repeat(x.shape[0] // 3, 1)), p, x, 1, n_steps=8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
