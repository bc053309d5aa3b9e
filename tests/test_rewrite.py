"""The rewrite engine: tracing, programs, interpreter, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attrax as ax
from attrax.rewrite import UnsupportedOperation, forward, program_for, substitute
from attrax.deeplift import deeplift_rule

D = torch.float64


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))
        out = self.conv2(h)
        out += h
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


def test_program_reproduces_module_bitwise_and_names_modules():
    torch.manual_seed(0)
    m = Residual().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 3, 6, 6)
    prog = program_for(f, p, (x,))
    assert torch.equal(forward(prog, p, (x,))[prog.output], m(x))
    calls = [n for n in prog.nodes if n.op == "call"]
    relus = [n for n in calls if n.packet == "relu"]
    assert len(relus) == 2 and all(n.module == "relu" for n in relus)  # a reused in-place module: two call sites
    assert {n.layer for n in calls if n.packet == "conv2d"} == {"conv", "conv2"}
    assert not any(n.target.split(".")[1].endswith("_") for n in calls)  # in-place ops rewritten out of place


def test_programs_are_memoised_per_batch_size():
    m = Residual().eval()
    f, p = ax.functionalize(m)
    a = program_for(f, p, (torch.randn(2, 3, 6, 6),))
    b = program_for(f, p, (torch.randn(2, 3, 6, 6),))
    c = program_for(f, p, (torch.randn(5, 3, 6, 6),))
    assert a is b and c is not a and c.batch == 5


def test_batch_dependent_views_run_at_their_own_size():
    def fn(p, x):
        h = torch.relu(x @ p["w"])
        return h.view(h.size(0), -1).sum(1, keepdim=True)

    f, _ = ax.functionalize(fn)
    p = {"w": torch.randn(4, 3, dtype=D)}
    for b in (1, 3, 7):
        x = torch.randn(b, 2, 4, dtype=D)
        prog = program_for(f, p, (x,))
        torch.testing.assert_close(forward(prog, p, (x,))[prog.output], fn(p, x))


def test_batch_branching_model_is_traced_per_batch_size():
    def fn(p, x):
        return x.sum(1, keepdim=True) * (2.0 if x.shape[0] > 2 else -1.0)

    for b in (1, 2, 3, 5):
        x = torch.randn(b, 3, dtype=D)
        a = ax.deeplift(fn, {}, x, None)
        torch.testing.assert_close(a, x * (2.0 if b > 2 else -1.0))


def test_generic_program_for_symbolic_batch():
    from attrax.rewrite import _program

    m = Residual().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 3, 6, 6)
    from attrax.rewrite import _training_flags

    spec = (
        tuple((k, tuple(v.shape), tuple(v.stride()), str(v.dtype), str(v.device)) for k, v in p.items()),
        ((tuple(x.shape[1:]), str(x.dtype), str(x.device)),),
        _training_flags(f),
    )
    prog = _program(f, spec, None)
    assert prog.batch is None
    for b in (1, 4, 9):
        xb = torch.randn(b, 3, 6, 6)
        torch.testing.assert_close(forward(prog, p, (xb,))[prog.output], m(xb))


def test_unsupported_op_names_op_node_and_module():
    class Sorted(nn.Module):
        def forward(self, x):
            return x.sort(-1).values

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = Sorted()
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.norm(self.fc(x)))

    f, p = ax.functionalize(Net().eval())
    with pytest.raises(ValueError, match=r"deeplift has no rule for aten\.sort\.default at node '.*' in module 'norm'"):
        ax.deeplift(f, p, torch.randn(2, 4), 0)


def test_rule_error_is_raised_before_any_model_evaluation():
    calls = []

    def fn(p, x):
        calls.append(1)
        return torch.atan2(x, x + 1).sum(1, keepdim=True)

    f, _ = ax.functionalize(fn)
    n_trace = len(calls)
    with pytest.raises(ValueError, match="atan2"):
        ax.deeplift(f, {}, torch.randn(2, 3), None)
    # only the (fake-tensor) trace ran the function; no real forward happened
    assert all(c == 1 for c in calls) and len(calls) >= n_trace


def test_training_mode_batchnorm_is_rejected_for_deeplift():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    f, p = ax.functionalize(m)
    with pytest.raises(ValueError, match="batch_norm"), pytest.warns(UserWarning, match="training mode"):
        ax.deeplift(f, p, torch.randn(5, 3), 0)


def test_inplace_write_into_used_view_is_refused():
    def fn(p, x):
        h = x * 2
        h[:, 0] = 0.0
        return h.sum(1, keepdim=True)

    with pytest.raises(ValueError, match="writes in place into a view"):
        ax.deeplift(fn, {}, torch.randn(2, 3), None)


def test_untraceable_model_is_a_clear_error():
    def fn(p, x):
        if x.sum() > 0:  # data-dependent control flow
            return x.sum(1, keepdim=True)
        return -x.sum(1, keepdim=True)

    with pytest.raises(ValueError, match="could not trace model_fn"):
        ax.deeplift(fn, {}, torch.randn(2, 3), None)


def test_tensor_left_out_of_params_is_the_modules_own():
    # as functional_call (and so every gradient method) does: a tensor missing from params is the module's
    m = Residual().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 3, 6, 6)
    full = ax.deeplift(f, p, x, 0)
    p = {k: v for k, v in p.items() if k != "conv.weight"}
    torch.testing.assert_close(ax.deeplift(f, p, x, 0), full)


def test_substitute_covers_every_dependent_call_site():
    m = Residual().eval()
    f, p = ax.functionalize(m)
    prog = program_for(f, p, (torch.randn(2, 3, 6, 6),))
    plan = substitute(prog, deeplift_rule, "deeplift")
    for n in prog.nodes:
        needs = n.op == "call" and n.dep and n.target != "getitem" and any(n.dep_refs)
        assert (plan[n.index] is not None) == needs


def test_functional_spellings_share_one_program_shape():
    def a(p, x):
        return F.relu(x @ p["w"]).sum(1, keepdim=True)

    def b(p, x):
        return (x @ p["w"]).relu().sum(1, keepdim=True)

    p = {"w": torch.randn(3, 3)}
    x = torch.randn(2, 3)
    pa, pb = program_for(a, p, (x,)), program_for(b, p, (x,))
    assert [n.target for n in pa.nodes] == [n.target for n in pb.nodes]


class _Head(nn.Module):
    """A language-model-shaped toy: (B, T, D) -> (B, T, V) with a dense head over every position."""

    def __init__(self, pick):
        super().__init__()
        self.body, self.head, self.pick = nn.Linear(6, 8), nn.Linear(8, 5, bias=False), pick

    def forward(self, x):
        return self.pick(self.head(F.gelu(self.body(x))))


def _heads(pick):
    torch.manual_seed(0)
    f, p = ax.functionalize(_Head(pick).double().eval())
    return f, p, torch.randn(3, 4, 6, dtype=torch.float64)


@pytest.mark.parametrize("pick, plain", [(lambda h: h[:, -1], True), (lambda h: h[:, 1:3].sum(1), False),
                                         (lambda h: h[:, 2], True)])
def test_selected_head_runs_on_the_selected_rows(pick, plain):
    from attrax.rewrite import select_before_linear

    f, p, x = _heads(pick)
    program = select_before_linear(program_for(f, p, (x,)))
    head = next(n for n in program.nodes if n.module == "head")
    assert head.shape[1] != 4 and program.nodes[head.args[0][1]].packet in ("select", "slice")
    env = forward(program, p, (x,))
    torch.testing.assert_close(env[program.output], f(p, x), rtol=1e-12, atol=1e-12)
    # lrp (gradient form, the moved head) equals the relevance form (traced as is) and, for a plain
    # selection, the same head explained over every position with the selection in the target
    for comp in (None, ax.composites.attn_lrp(), ax.composites.epsilon_plus()):
        moved = ax.lrp(f, p, x, 2, composite=comp)
        torch.testing.assert_close(moved, ax.lrp(f, p, x, 2, composite=comp, form="relevance"), rtol=1e-10, atol=1e-13)
        if not plain:
            continue
        whole, pw = ax.functionalize(_Head(lambda h: h).double().eval())
        pw = {k: p[k] for k in pw}
        torch.testing.assert_close(moved, ax.lrp(whole, pw, x, lambda out: pick(out)[:, 2], composite=comp),
                                   rtol=1e-10, atol=1e-13)
    # the program other methods use keeps the head whole: CRP over the head's channels after an lrp call
    kept = ax.conditional(f, p, x, 2, [{"head": list(range(5))}], exclude_parallel=False)
    torch.testing.assert_close(kept[0], ax.lrp(f, p, x, 2), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("pick", [lambda h: h[..., :3], lambda h: h[:, -1] + h.mean(1), lambda h: h[0]])
def test_head_stays_where_the_selection_is_not_along_rows_of_it_alone(pick):
    from attrax.rewrite import select_before_linear

    f, p, x = _heads(pick)
    program = program_for(f, p, (x,))
    assert select_before_linear(program) is program


@pytest.mark.parametrize("case", ["causal", "float_mask", "scale", "gqa_flag", "float64", "noncontiguous"])
def test_fused_attention_vjp_by_the_flash_kernel_equals_autograds(case):
    """Where scaled_dot_product_attention runs the CPU flash kernel, the fused attention rule calls that kernel
    and its backward directly (no autograd graph); the value and the vjp equal autograd's through SDPA."""
    from attrax._node import Node
    from attrax.rewrite import _attention_with_vjp, _flash_call

    dtype = torch.float64 if case == "float64" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=dtype) for _ in range(3))
    if case == "noncontiguous":
        q = torch.randn(2, 5, 3, 8, generator=g, dtype=dtype).transpose(1, 2)
    mask = torch.randn(2, 1, 5, 5, generator=g, dtype=dtype) if case == "float_mask" else None
    args = [q, k, v, mask, 0.0, case == "causal"]
    kwargs = {"scale": 0.3} if case == "scale" else {"enable_gqa": True} if case == "gqa_flag" else {}
    assert _flash_call(args, kwargs) is not None
    aux = {}
    node = Node(0, "call", "aten.scaled_dot_product_attention.default")
    out = _attention_with_vjp(node, [None], aux, args, kwargs)
    want, pull = torch.func.vjp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, *args[3:], **kwargs), q, k, v)
    torch.testing.assert_close(out, want)
    cot = torch.randn(out.shape, generator=g, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    for got, exp in zip(aux[0](cot), pull(cot)):
        torch.testing.assert_close(got, exp)


def test_attention_outside_the_flash_kernels_reach_keeps_autograd():
    from attrax.rewrite import _flash_call

    q = torch.randn(2, 3, 5, 8)
    assert _flash_call([q, q, q, torch.ones(5, 5, dtype=torch.bool)], {}) is None  # boolean mask
    assert _flash_call([q, q, q, None, 0.1], {}) is None  # dropout
    assert _flash_call([q, q[:, :1], q[:, :1]], {"enable_gqa": True}) is None  # grouped heads
    assert _flash_call([q, q, q.half()], {}) is None  # mixed dtypes
    assert _flash_call([q[..., ::2], q[..., ::2], q[..., ::2]], {}) is None  # last dim strided
    assert _flash_call([q, q, q, torch.zeros(1, 5, 5)], {}) is None  # a 3-d mask: the kernel refuses it (review)
    assert _flash_call([q, q, q, torch.zeros(5, 5)], {}) is not None


def test_attention_with_a_three_dimensional_mask_runs_fused():
    """SDPA broadcasts a (1, T, S) mask; the flash kernel takes 2-d and 4-d ones only (a reviewer's crash)."""

    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 3)
            self.register_buffer("mask", torch.randn(1, 5, 5))

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
            return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask).transpose(1, 2).flatten(2))[:, -1]

    torch.manual_seed(0)
    f, p = ax.functionalize(Att().double().eval())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    a = ax.lrp(f, p, x, 1, composite=ax.composites.attn_lrp())
    b = ax.lrp(f, p, x, 1, composite=ax.composites.attn_lrp(), form="relevance")
    assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-3 * b.abs().max()


def test_head_with_a_rule_over_all_rows_stays_whole():
    """Epsilon(norm_scale=True) scales its stabiliser by the whole output's norm: moved onto the selected rows it
    gave another relevance (a reviewer's find); such a head is not moved."""
    f, p, x = _heads(lambda h: h[:, -1])
    comp = {nn.Linear: ax.rules.Epsilon(0.5, norm_scale=True)}
    torch.testing.assert_close(ax.lrp(f, p, x, 2, composite=comp), ax.lrp(f, p, x, 2, composite=comp, form="relevance"),
                               rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("tail", ["dropout", "type_as", "einsum"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_published_output_survives_the_pass_that_writes_over_dead_values(tail, mode):
    """lrp's reverse pass writes over values nothing reads any more; an output that *is* such a value (eval
    dropout and a same-dtype type_as hand back their argument) must come back intact (a reviewer's find)."""

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.drop = nn.Linear(5, 6), nn.Linear(6, 4), nn.Dropout(0.2)

        def forward(self, x):
            h = self.l2(torch.relu(self.l1(x)))
            if tail == "einsum":  # one operand: a view of h
                return torch.einsum("bi->bi", h)
            return self.drop(h) if tail == "dropout" else h.type_as(x)

    torch.manual_seed(0)
    f, p = ax.functionalize(Tail().eval())
    x = torch.randn(3, 5)
    with mode():
        out, _ = ax.value_and_attribution(ax.lrp, f, p, x, 1)
        torch.testing.assert_close(out, f(p, x), rtol=0, atol=0)


class _Act(nn.Module):
    """A two-layer MLP whose activation is a function of the hidden layer, written however the case says."""

    def __init__(self, act):
        super().__init__()
        self.fc, self.out, self.act = nn.Linear(6, 8), nn.Linear(8, 3), act

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


_C = math.sqrt(2.0 / math.pi)
_WRITTEN = {  # activations written out in steps -> the op they are
    "gelu_new": (lambda h: 0.5 * h * (1.0 + torch.tanh(_C * (h + 0.044715 * torch.pow(h, 3.0)))), "gelu", "tanh"),
    "gelu_erf": (lambda h: h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0))), "gelu", None),
    "swish": (lambda h: h * torch.sigmoid(h), "silu", None),
}


@pytest.mark.parametrize("case", sorted(_WRITTEN))
def test_activation_written_out_runs_as_its_one_op(case):
    """fuse_elementwise: an elementwise region that computes a known activation becomes that op; the program's
    value is unchanged (to rounding), and LRP on it equals LRP on the model built with the op itself."""
    from attrax.rewrite import fuse_elementwise

    fn, packet, approximate = _WRITTEN[case]
    torch.manual_seed(0)
    m = _Act(_Lambda(fn)).double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(4, 6, dtype=D)
    program = program_for(f, p, (x,))
    fused = fuse_elementwise(program)
    calls = [n.packet for n in fused.nodes if n.op == "call"]
    assert calls.count(packet) == 1 and not {"tanh", "erf", "sigmoid", "pow"} & set(calls)
    node = next(n for n in fused.nodes if n.packet == packet)
    assert dict(node.kwargs).get("approximate", ("c", None))[1] == approximate
    torch.testing.assert_close(forward(fused, p, (x,))[fused.output], m(x), rtol=1e-13, atol=1e-13)
    op = nn.GELU(approximate=approximate or "none") if packet == "gelu" else nn.SiLU()
    m2 = _Act(op).double().eval()
    m2.load_state_dict(m.state_dict())
    f2, p2 = ax.functionalize(m2)
    for comp in (ax.composites.attn_lrp(), ax.composites.epsilon_plus()):
        torch.testing.assert_close(ax.lrp(f, p, x, 1, composite=comp), ax.lrp(f2, p2, x, 1, composite=comp),
                                   rtol=1e-12, atol=1e-14)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


@pytest.mark.parametrize("case", ["rounded_constant", "inner_value_read_elsewhere", "unknown_function", "tensor_operand"])
def test_elementwise_region_that_is_no_known_op_stays_written_out(case):
    from attrax.rewrite import fuse_elementwise

    w = torch.linspace(0.5, 1.5, 8, dtype=D)
    acts = {
        # a rounded constant computes another function (by ~1e-8): not GELU
        "rounded_constant": lambda h: 0.5 * h * (1.0 + torch.tanh(0.7978845 * (h + 0.044715 * torch.pow(h, 3.0)))),
        # the tanh's value is also used outside the region: the steps must stay
        "inner_value_read_elsewhere": lambda h: (lambda t: 0.5 * h * (1.0 + t) + t.sum(-1, keepdim=True))(
            torch.tanh(_C * (h + 0.044715 * torch.pow(h, 3.0)))),
        "unknown_function": lambda h: h * torch.tanh(h),
        "tensor_operand": lambda h: h * torch.sigmoid(h * w),  # a per-unit slope: not a function of h alone
    }
    torch.manual_seed(0)
    m = _Act(_Lambda(acts[case])).double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(4, 6, dtype=D)
    program = program_for(f, p, (x,))
    assert fuse_elementwise(program) is program
    # and LRP still runs on the steps (the region rule) with the same values as before
    ax.lrp(f, p, x, 1, composite=ax.composites.attn_lrp())
