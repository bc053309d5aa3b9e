"""LRP for transformers (API.md §9): the AttnLRP and CP-LRP composites.

Three kinds of evidence:

1. A hand-written reference in LXT's "efficient" formulation: gradient x input of a forward whose
   gradients are modified by hand (``.detach()`` on normalisation scales, ``y = x * (f(x)/x).detach()``
   on activations, half the gradient through each operand of a product of two activations, the
   true softmax gradient), on tiny random HF GPT-2, BERT, Llama, ViT, ``nn.TransformerEncoder`` and
   hand-written ConvNeXt, squeeze-excitation, SwiGLU and attention blocks. The reference patches
   the HF modules' forwards and ``F.layer_norm`` / ``F.scaled_dot_product_attention`` inside a
   context manager (``unittest.mock``), so nothing outlives a test.
2. LXT 2.1's own patches (``lxt.efficient``), applied and undone inside the test.
3. Conservation, gradients w.r.t. params against finite differences, vmap over targets.

At epsilon = 0 attrax's relevance rules equal gradient x input with those gradients exactly; the
default epsilon = 1e-6 differs from it by O(epsilon / |z|) at each stabilised division.
"""

import contextlib
import importlib.machinery
import math
import os
import sys
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attrax as ax
from attrax.composites import Kind
from conftest import assert_grad_matches_finite_differences

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification)
from transformers import activations as hf_act  # noqa: E402
from transformers.models.gpt2 import modeling_gpt2  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.vit import modeling_vit  # noqa: E402

D = torch.float64
R = ax.rules


# ------------------------------------------------------------------ the reference, by hand


def grad_as(value, proxy):
    """``value``, with the gradient of ``proxy`` (exactly ``value``: ``proxy - proxy`` is 0)."""
    return value.detach() + (proxy - proxy.detach())


def identity(f, x):
    """The identity rule in gradient x input form: y = f(x) with the gradient f(x)/x."""
    y = f(x)
    return grad_as(y, x * (y / x).detach())


def halves(op, a, b):
    """``op(a, b)`` with half the gradient through each operand (the uniform rule)."""
    return 0.5 * (op(a, b.detach()) + op(a.detach(), b))


class Plain:
    """The forward as written: what attrax attributes."""

    def act(self, f, x):
        return f(x)

    def scale(self, s):  # a normalisation scale or denominator
        return s

    def prod(self, op, a, b):  # a product of two activations, neither a gate
        return op(a, b)

    def gated(self, op, gate, u):  # a product whose first operand went through a nonlinearity
        return op(gate, u)

    def softmax(self, x):
        return torch.softmax(x, -1)


class AttnRef(Plain):
    """AttnLRP: identity on activations, scales held constant, every product split in halves."""

    def act(self, f, x):
        return identity(f, x)

    def scale(self, s):
        return s.detach()

    def prod(self, op, a, b):
        return halves(op, a, b)

    def gated(self, op, gate, u):
        return halves(op, gate, u)


class CPRef(AttnRef):
    """CP-LRP: as AttnLRP, but gates and attention weights held constant."""

    def gated(self, op, gate, u):
        return op(gate.detach(), u)


OPS = [Plain()]  # what the hand-written blocks below call; swapped by `reference`


def ref_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    y = centred * OPS[0].scale(torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps))
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def ref_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    g = x.reshape(x.shape[0], num_groups, -1)
    centred = g - g.mean(-1, keepdim=True)
    y = (centred * OPS[0].scale(torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps))).reshape(x.shape)
    affine = (1, -1) + (1,) * (x.ndim - 2)
    y = y if weight is None else y * weight.reshape(affine)
    return y if bias is None else y + bias.reshape(affine)


def ref_rms_norm(x, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * OPS[0].scale(torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps))
    return y if weight is None else y * weight


def ref_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = OPS[0].prod(torch.matmul, q, k.transpose(-2, -1)) * s
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return OPS[0].gated(torch.matmul, OPS[0].softmax(scores), v)


def _hf_rms_norm(self, hidden_states):  # LlamaRMSNorm.forward with the scale through OPS
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * OPS[0].scale(torch.rsqrt(variance + self.variance_epsilon))
    return self.weight * hidden_states.to(input_dtype)


def _hf_gated_mlp(self, x):  # LlamaMLP.forward
    return self.down_proj(OPS[0].gated(torch.mul, OPS[0].act(self.act_fn, self.gate_proj(x)), self.up_proj(x)))


def _activation(cls):
    original = cls.forward
    return mock.patch.object(cls, "forward", lambda self, x: OPS[0].act(lambda t: original(self, t), x))


@contextlib.contextmanager
def reference(ops):
    """Run models with the reference's modified gradients (``ops``: AttnRef() or CPRef())."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(F, "layer_norm", ref_layer_norm))
        stack.enter_context(mock.patch.object(F, "group_norm", ref_group_norm))
        stack.enter_context(mock.patch.object(F, "rms_norm", ref_rms_norm))
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", ref_sdpa))
        stack.enter_context(mock.patch.object(modeling_llama.LlamaRMSNorm, "forward", _hf_rms_norm))
        stack.enter_context(mock.patch.object(modeling_llama.LlamaMLP, "forward", _hf_gated_mlp))
        for cls in (hf_act.NewGELUActivation, hf_act.GELUActivation, nn.Tanh, nn.GELU, nn.SiLU, nn.Hardswish):
            stack.enter_context(_activation(cls))
        stack.enter_context(mock.patch.object(sys.modules[__name__], "OPS", [ops]))
        yield


def gradient_x_input(net, x, target, ops):
    """The reference attribution: x times the modified gradient of the target logit."""
    with reference(ops):
        x = x.detach().clone().requires_grad_(True)
        out = net(x)
        (g,) = torch.autograd.grad(out[:, target].sum(), x)
    return (x * g).detach()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------- models


class LastToken(nn.Module):
    """An HF model on input embeddings, returning the logits of the last position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, e):
        out = self.model(inputs_embeds=e).logits
        return out[:, -1] if out.ndim == 3 else out


class Pixels(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm: (x - u) / sqrt(s + eps), written out."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / OPS[0].scale(torch.sqrt(s + self.eps))
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXt(nn.Module):
    """Stem, one ConvNeXt block (depthwise 7x7, LayerNorm2d, pointwise MLP with GELU, layer scale,
    residual), global pooling, LayerNorm and a linear head."""

    def __init__(self, c=8, classes=3):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, c, 2, stride=2), LayerNorm2d(c)
        self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), LayerNorm2d(c)
        self.pw1, self.act, self.pw2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.head_norm, self.head = nn.LayerNorm(c), nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        h = self.norm(self.dw(x)).permute(0, 2, 3, 1)
        h = self.pw2(self.act(self.pw1(h))) * self.gamma
        x = x + h.permute(0, 3, 1, 2)
        return self.head(self.head_norm(x.mean((2, 3))))


class SqueezeExcite(nn.Module):
    """MobileNetV3/EfficientNet style: conv, GroupNorm, Hardswish, depthwise conv, SiLU written out
    (x * sigmoid(x), an elementwise region), squeeze-excitation x * sigmoid(fc(pool(x))), projection,
    residual, pooling, head."""

    def __init__(self, c=6, classes=3):
        super().__init__()
        self.conv, self.norm, self.act = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(2, c), nn.Hardswish()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc1, self.fc2 = nn.Conv2d(c, 3, 1), nn.Conv2d(3, c, 1)
        self.proj, self.head = nn.Conv2d(c, c, 1), nn.Linear(c, classes)

    def forward(self, x):
        x = self.act(self.norm(self.conv(x)))
        h = OPS[0].act(lambda t: t * torch.sigmoid(t), self.dw(x))
        s = OPS[0].act(torch.sigmoid, self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        h = OPS[0].gated(torch.mul, s, h)
        x = x + self.proj(h)
        return self.head(x.mean((2, 3)))


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        return self.weight * (x * OPS[0].scale(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)))


class SwiGLU(nn.Module):
    """RMSNorm, a gated MLP down(silu(gate(h)) * up(h)), residual, nn.RMSNorm, head on the mean token."""

    def __init__(self, d=8, hidden=12, classes=3, bias=True):
        super().__init__()
        self.norm = RMSNorm(d)
        self.gate, self.up = nn.Linear(d, hidden, bias=bias), nn.Linear(d, hidden, bias=bias)
        self.down, self.head = nn.Linear(hidden, d, bias=bias), nn.Linear(d, classes, bias=bias)
        self.final = nn.RMSNorm(d)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.down(OPS[0].gated(torch.mul, OPS[0].act(F.silu, self.gate(h)), self.up(h)))
        return self.head(self.final(x).mean(1))


class Attention(nn.Module):
    """A pre-norm causal self-attention block with an explicit softmax(q k^T / sqrt(d)) v (masked with
    -inf), then a GELU MLP; head on the last token."""

    def __init__(self, d=8, heads=2, classes=3, bias=True):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
        self.qkv, self.out = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d, bias=bias), nn.GELU(), nn.Linear(2 * d, d, bias=bias)
        self.head = nn.Linear(d, classes, bias=bias)
        self.register_buffer("future", torch.ones(16, 16, dtype=torch.bool).triu(1))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = OPS[0].prod(torch.matmul, q, k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(self.future[:t, :t], float("-inf"))
        a = OPS[0].gated(torch.matmul, OPS[0].softmax(scores), v)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        return self.head(x[:, -1])


def gpt2(layers=2):
    cfg = GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=11, n_positions=8)
    return LastToken(GPT2LMHeadModel(cfg)), (2, 5, 16)


def llama(layers=2):
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=24, vocab_size=11, max_position_embeddings=8)
    return LastToken(LlamaForCausalLM(cfg)), (2, 5, 16)


def bert(layers=2):
    cfg = BertConfig(num_hidden_layers=layers, hidden_size=16, num_attention_heads=2, intermediate_size=24,
                     vocab_size=11, max_position_embeddings=8, num_labels=3)
    return LastToken(BertForSequenceClassification(cfg)), (2, 5, 16)


def vit(layers=2):
    cfg = ViTConfig(num_hidden_layers=layers, hidden_size=16, num_attention_heads=2, intermediate_size=24,
                    image_size=8, patch_size=4, num_labels=3)
    return Pixels(ViTForImageClassification(cfg)), (2, 3, 8, 8)


def torch_encoder(layers=2):
    layer = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True, dropout=0.1, activation=nn.GELU())
    return nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.Flatten(),
                         nn.Linear(5 * 16, 3)), (2, 5, 16)


MODELS = {
    "gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit, "torch_encoder": torch_encoder,
    "convnext": lambda: (ConvNeXt(), (2, 3, 8, 8)), "squeeze_excite": lambda: (SqueezeExcite(), (2, 3, 6, 6)),
    "swiglu": lambda: (SwiGLU(), (2, 4, 8)), "attention": lambda: (Attention(), (2, 5, 8)),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    net, shape = MODELS[name]()
    net = net.to(D).eval()
    return net, torch.randn(*shape, dtype=D)


# ------------------------------------------------------------------ 1. against the reference


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("which", ["attn_lrp", "cp_lrp"])
def test_equals_reference(name, which):
    """At epsilon = 0 both composites are gradient x input with the reference's gradients."""
    net, x = build(name)
    f, p = ax.functionalize(net)
    composite = getattr(ax.composites, which)(epsilon=0.0)
    got = ax.lrp(f, p, x, 1, composite=composite)
    want = gradient_x_input(net, x, 1, AttnRef() if which == "attn_lrp" else CPRef())
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, want) < 1e-5, rel_err(got, want)


def test_default_epsilon_is_close_to_the_limit():
    """The default epsilon = 1e-6 is a small perturbation of the epsilon -> 0 reference."""
    net, x = build("gpt2")
    f, p = ax.functionalize(net)
    got = ax.lrp(f, p, x, 1, composite=ax.composites.attn_lrp())
    assert rel_err(got, gradient_x_input(net, x, 1, AttnRef())) < 1e-3


# ---------------------------------------------------------------------------- 2. LXT 2.1


@pytest.fixture(scope="module")
def lxt():
    """LXT's efficient-mode patch modules. ``lxt.efficient``'s package ``__init__`` imports its model
    table, which imports torchvision (for torchvision's ViT) at import time; torchvision is not
    installed here, so the packages are entered without their ``__init__`` and the patch maps are
    applied as ``lxt.efficient.monkey_patch`` does (``patch(target)`` for every entry)."""
    lxt = pytest.importorskip("lxt")
    import importlib

    root = os.path.join(os.path.dirname(lxt.__file__), "efficient")
    packages = {}
    for name, path in (("lxt.efficient", root), ("lxt.efficient.models", os.path.join(root, "models"))):
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        packages[name] = pkg
    if any(name in sys.modules for name in packages):
        pytest.skip("lxt.efficient is imported already")
    sys.modules.update(packages)
    try:
        yield types.SimpleNamespace(**{m: importlib.import_module(f"lxt.efficient.{m}")
                                       for m in ("patches", "models.gpt2", "models.llama", "models.bert")})
    finally:  # only LXT's own modules leave (not what other code imported meanwhile)
        for name in [n for n in sys.modules if n == "lxt.efficient" or n.startswith("lxt.efficient.")]:
            del sys.modules[name]


@contextlib.contextmanager
def lxt_patched(patch_map):
    """Apply an LXT patch map (it monkey-patches classes and modules globally) and undo it on exit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    saved = []
    for target in patch_map:
        if isinstance(target, type):
            names = ("forward", "original_forward")
            saved.append((target, {k: target.__dict__[k] for k in names if k in target.__dict__}))
        else:  # a Python module: attention functions replaced, or (BERT) every attribute
            saved.append((target, dict(vars(target))))
    local = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)  # CP-LRP's patch writes into the shared interface
    try:
        for target, patch in patch_map.items():
            assert patch(target), f"LXT could not patch {target}"
        yield
    finally:
        for target, attrs in saved:
            names = ("forward", "original_forward") if isinstance(target, type) else list(vars(target))
            for k in names:
                if k in vars(target) and k not in attrs:
                    delattr(target, k)
            for k, v in attrs.items():
                setattr(target, k, v)
        ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._local_mapping.update(local)


def _vit_map(lxt, cp):
    """LXT ships no map for HF's ViT: its LayerNorm and activation patches and its attention wrapper."""
    from functools import partial

    pt = lxt.patches
    return {nn.LayerNorm: partial(pt.patch_method, pt.layer_norm_forward),
            hf_act.GELUActivation: partial(pt.patch_method, pt.non_linear_forward, keep_original=True),
            modeling_vit: pt.patch_cp_attention if cp else pt.patch_attention}


def _torch_encoder_map(lxt):
    """LXT's map for torchvision's ViT (``lxt.efficient.models.vit_torch.cp_LRP``), whose patches act on
    ``torch.nn`` classes: CP-LRP on ``nn.MultiheadAttention``, LayerNorm and GELU."""
    from functools import partial

    pt = lxt.patches
    return {nn.GELU: partial(pt.patch_method, pt.non_linear_forward, keep_original=True),
            nn.LayerNorm: partial(pt.patch_method, pt.layer_norm_forward),
            nn.MultiheadAttention: partial(pt.patch_method, pt.cp_multi_head_attention_forward, keep_original=True)}


def _lxt_map(lxt, name, cp):
    if name in ("gpt2", "llama", "bert"):
        module = getattr(lxt, f"models.{name}")
        if cp and not hasattr(module, "cp_LRP"):
            pytest.skip(f"LXT 2.1 has no CP-LRP map for {name}")
        return module.cp_LRP if cp else module.attnLRP
    if name == "vit":
        return _vit_map(lxt, cp)
    if not cp:
        pytest.skip("LXT 2.1 has no AttnLRP patch for nn.MultiheadAttention (only CP-LRP, for torchvision's ViT)")
    return _torch_encoder_map(lxt)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "torch_encoder"])
@pytest.mark.parametrize("which", ["attn_lrp", "cp_lrp"])
def test_equals_lxt(lxt, name, which):
    net, x = build(name)
    f, p = ax.functionalize(net)
    got = ax.lrp(f, p, x, 1, composite=getattr(ax.composites, which)(epsilon=0.0))
    patch_map = _lxt_map(lxt, name, which == "cp_lrp")
    with lxt_patched(patch_map):
        if name == "bert":  # LXT replaces modeling_bert's classes: build its model with the same weights
            from transformers.models.bert import modeling_bert

            lxt_net = LastToken(modeling_bert.BertForSequenceClassification(net.model.config)).to(D).eval()
            lxt_net.load_state_dict(net.state_dict())
        else:
            lxt_net = net
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(lxt_net(xg)[:, 1].sum(), xg)
    want = x * g
    assert rel_err(got, want) < 1e-5, rel_err(got, want)


# ------------------------------------------------------------------------ 3. conservation


def zero_biases(net):
    """Biases, and the constants added to the input (position and token-type embeddings, CLS token), to 0."""
    with torch.no_grad():
        for name, q in net.named_parameters():
            constant = ("wpe", "position_embeddings", "token_type", "cls_token")
            if name.endswith("bias") or any(s in name for s in constant):
                q.zero_()
    return net


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "swiglu", "attention", "convnext", "squeeze_excite"])
def test_cp_lrp_conserves(name):
    net, x = build(name)
    zero_biases(net)
    f, p = ax.functionalize(net)
    rel = ax.lrp(f, p, x, 1, composite=ax.composites.cp_lrp(epsilon=0.0))
    logit = net(x)[:, 1].detach()
    torch.testing.assert_close(rel.flatten(1).sum(1), logit, rtol=1e-4, atol=0)


class Lossy(AttnRef):
    """AttnRef recording, per sample, what each softmax's Taylor rule drops: sum R_out - sum R_in."""

    def __init__(self):
        self.loss = 0

    def softmax(self, x):
        s = torch.softmax(x, -1)

        def record(g_in, g_out):
            finite = x.detach().clamp(min=torch.finfo(x.dtype).min)
            kept = (s.detach() * g_out).flatten(1).sum(1) - (finite * g_in).flatten(1).sum(1)
            self.loss = self.loss + kept

        store = {}
        s.register_hook(lambda g: store.setdefault("out", g))
        x.register_hook(lambda g: record(g, store["out"]))
        return s


@pytest.mark.parametrize("name", ["gpt2", "llama", "attention"])
def test_attn_lrp_conserves_but_for_the_softmax(name):
    net, x = build(name)
    zero_biases(net)
    if name == "gpt2":  # GPT-2 initialises weights with std 0.02: attention near uniform, the loss tiny
        with torch.no_grad():
            for q in net.parameters():
                q.mul_(5 if q.ndim == 2 else 1)
    f, p = ax.functionalize(net)
    rel = ax.lrp(f, p, x, 1, composite=ax.composites.attn_lrp(epsilon=0.0))
    ops = Lossy()
    gradient_x_input(net, x, 1, ops)
    logit = net(x)[:, 1].detach()
    assert float(ops.loss.abs().max()) > 1e-3 * float(logit.abs().max())  # the softmax rule does lose relevance
    torch.testing.assert_close(rel.flatten(1).sum(1), logit - ops.loss, rtol=1e-4, atol=0)


# --------------------------------------------------------------------- 4. composability


@pytest.mark.parametrize("name, names", [
    ("attention", ("qkv.weight", "ln1.weight", "ln2.bias", "fc1.weight", "head.weight")),
    ("swiglu", ("norm.weight", "gate.weight", "up.bias", "down.weight")),
])
@pytest.mark.parametrize("which", ["attn_lrp", "cp_lrp"])
def test_grad_wrt_params_matches_finite_differences(name, names, which):
    """One block (pre-norm attention with a GELU MLP; RMSNorm and a SwiGLU MLP), float64."""
    net, x = build(name)
    f, p = ax.functionalize(net)
    weights = {k: v for k, v in net.named_parameters() if k in names}
    assert len(weights) == len(names)
    comp = getattr(ax.composites, which)()

    def loss(w):
        return (ax.lrp(f, {**p, **w}, x, 2, composite=comp) ** 2).sum()

    assert_grad_matches_finite_differences(loss, weights, per_tensor=2, rtol=1e-4)


def test_vmap_over_targets_equals_loop():
    net, x = build("gpt2")
    f, p = ax.functionalize(net)
    ts = torch.tensor([[0, 1], [4, 2], [3, 3]])
    comp = ax.composites.attn_lrp()
    vm = torch.func.vmap(lambda t: ax.lrp(f, p, x, t, composite=comp))(ts)
    torch.testing.assert_close(vm, torch.stack([ax.lrp(f, p, x, t, composite=comp) for t in ts]))


def test_compiled_equals_eager():
    net, x = build("attention")
    f, p = ax.functionalize(net)
    comp = ax.composites.attn_lrp()
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: ax.lrp(f, p, x, t, composite=comp), backend="aot_eager", fullgraph=True)
    t = torch.tensor([1, 2])
    torch.testing.assert_close(fn(x, t), ax.lrp(f, p, x, t, composite=comp))


# ------------------------------------------------------------ the graph patterns and the rule table


def _kinds(net, x):
    from attrax.lrp import node_kind
    from attrax.rewrite import program_for

    f, p = ax.functionalize(net)
    prog = program_for(f, p, (x,))
    return prog, {n.index: node_kind(prog, n) for n in prog.nodes if n.op == "call" and n.dep}


def test_gpt2_graph_kinds():
    """Conv1D (addmm) is a linear layer; gelu_new is one activation region; LayerNorm's scale is a
    normalisation; attention products are products; no node is left without a kind."""
    net, x = build("gpt2", 0)
    prog, kinds = _kinds(net, x)
    by_module = {}
    for i, k in kinds.items():
        by_module.setdefault(prog.nodes[i].module, []).append((prog.nodes[i].packet, k))
    assert ("linear", "linear") in by_module["model.transformer.h.0.attn.c_attn"]
    assert sum(k == "normalize" for _, k in by_module["model.transformer.h.0.ln_1"]) == 1
    assert [k for pk, k in by_module["model.transformer.h.0.attn"] if pk == "matmul"] == ["product", "product"]
    act = by_module["model.transformer.h.0.mlp.act"]
    assert act[-1] == ("mul", "activation") and "product" not in {k for _, k in act}
    assert "other" not in kinds.values()


def test_conv1d_matches_linear_keys_and_is_the_first_layer():
    net, x = build("gpt2")
    f, p = ax.functionalize(net)
    flat = R.Flat()
    eps = ax.composites.attn_lrp(epsilon=0.0)
    by_kind = ax.composites.mapping(by_type={Kind("linear"): R.Epsilon(0.25), **dict(eps.by_type)})
    by_type = ax.composites.mapping(by_type={nn.Linear: R.Epsilon(0.25), **dict(eps.by_type)})
    torch.testing.assert_close(ax.lrp(f, p, x, 1, composite=by_kind), ax.lrp(f, p, x, 1, composite=by_type))
    assert rel_err(ax.lrp(f, p, x, 1, composite=by_kind), ax.lrp(f, p, x, 1, composite=eps)) > 1e-3
    # the first layer: only block 0's c_attn (the wte/lm_head matrix is the last layer)
    first = ax.composites.mapping(by_type=dict(eps.by_type), first={Kind("linear"): flat})
    by_name = ax.composites.mapping(by_type=dict(eps.by_type), by_name={"model.transformer.h.0.attn.c_attn": flat})
    torch.testing.assert_close(ax.lrp(f, p, x, 1, composite=first), ax.lrp(f, p, x, 1, composite=by_name))


@pytest.mark.parametrize("name", ["convnext", "squeeze_excite", "swiglu", "gpt2"])
@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat",
                                       "excitation_backprop", "guided_backprop"])
def test_cnn_composites_run_on_new_blocks(name, composite):
    net, x = build(name)
    f, p = ax.functionalize(net)
    rel = ax.lrp(f, p, x, 1, composite=getattr(ax.composites, composite)())
    assert rel.shape == x.shape and torch.isfinite(rel).all() and rel.abs().sum() > 0


@pytest.mark.parametrize("name", ["convnext", "squeeze_excite", "swiglu", "attention"])
def test_default_holds_gates_and_scales_constant(name):
    """composite=None: identity on activations, normalisation scales and gates held constant (the CP-LRP
    reference); the defaults' epsilon = 1e-6 is set to 0 on layers and linear ops, the rest are the defaults."""
    net, x = build(name)
    f, p = ax.functionalize(net)
    zero = {Kind("layer"): R.Epsilon(0.0), Kind("add"): R.Norm(0.0), Kind("arithmetic"): R.Norm(0.0),
            Kind("avgpool"): R.Norm(0.0)}
    rel = ax.lrp(f, p, x, 1, composite=zero)
    assert rel_err(rel, gradient_x_input(net, x, 1, CPRef())) < 1e-5


def test_rules_refuse_ops_they_do_not_fit():
    net, x = build("swiglu")
    f, p = ax.functionalize(net)
    for rule, key in ((R.Uniform(), nn.Linear), (R.HoldScale(), Kind("activation")), (R.SoftmaxTaylor(), Kind("add"))):
        with pytest.raises(ValueError, match=f"rule {type(rule).__name__} does not apply"):
            ax.lrp(f, p, x, 1, composite={key: rule})
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        R.Uniform(-1.0)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        R.HoldScale(-1.0)
