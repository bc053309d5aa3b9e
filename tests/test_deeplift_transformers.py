"""DeepLift on transformers and modern CNN blocks: exact summation-to-delta (issue 16, acceptance 1).

Normalisation and attention are traced into primitives with exact rules (``attrax._decompose``), so
completeness holds to rounding on any model built from linear ops, elementwise nonlinearities,
products of activations, softmax and normalisation. Tiny random-init configs, built here (no hub).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attrax as ax

D = torch.float64


class Logits(nn.Module):
    """An HF model as ``f(inputs_embeds) -> logits`` (the last position's for LMs)."""

    def __init__(self, model: nn.Module, pixels: bool = False) -> None:
        super().__init__()
        self.model, self.pixels = model, pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x) if self.pixels else self.model(inputs_embeds=x)
        logits = out.logits
        return logits[:, -1] if logits.ndim == 3 else logits


def hf_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40, n_positions=16)
        return Logits(transformers.GPT2LMHeadModel(cfg)), (3, 7, 32)
    if name == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=48, vocab_size=40, max_position_embeddings=16)
        return Logits(transformers.LlamaForCausalLM(cfg)), (3, 7, 32)
    if name == "gemma":  # RMSNorm in float32, cast back with type_as(x): a cast whose dtype source depends on x
        cfg = transformers.GemmaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=48, vocab_size=40, max_position_embeddings=16, head_dim=8)
        return Logits(transformers.GemmaForCausalLM(cfg)), (3, 7, 32)
    if name == "bert":
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                                      vocab_size=40, max_position_embeddings=16, num_labels=3)
        return Logits(transformers.BertForSequenceClassification(cfg)), (3, 7, 32)
    if name == "vit":
        cfg = transformers.ViTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                                     image_size=16, patch_size=4, num_labels=3)
        return Logits(transformers.ViTForImageClassification(cfg), pixels=True), (3, 3, 16, 16)
    raise KeyError(name)


class ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock layout: depthwise 7x7, channels-last LayerNorm, 4x MLP with GELU, layer scale."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h)))) * self.gamma
        y = x + h.permute(0, 3, 1, 2)
        return self.head(y.mean((2, 3)))


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm written out: (x - u) / sqrt(s + eps)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class SEBlock(nn.Module):
    """Squeeze-excitation (EfficientNet/MobileNetV3): x * gate(pool(x)), SiLU/Hardswish convs."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = LayerNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.group = nn.GroupNorm(2, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = F.silu(self.norm(self.conv(x)))
        gate = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        h = F.hardswish(self.group(h * gate))
        return self.head(h.mean((2, 3)))


class SwiGLU(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.gate_up = nn.Linear(d, 2 * 24, bias=False)
        self.down = nn.Linear(24, d, bias=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return self.head((x + self.down(F.silu(gate) * up)).mean(1))


def torch_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 48, batch_first=True, dropout=0.1)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(7 * 32, 3))


LOCAL = {
    "torch_encoder": (torch_encoder, (3, 7, 32)),
    "convnext_block": (ConvNeXtBlock, (3, 8, 9, 9)),
    "se_block": (SEBlock, (3, 3, 9, 9)),
    "swiglu": (SwiGLU, (3, 7, 16)),
}
MODELS = ["gpt2", "bert", "llama", "gemma", "vit", *LOCAL]


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name in LOCAL:
        torch.manual_seed(0)
        make, shape = LOCAL[name]
        return make(), shape
    return hf_model(name)


def relative_gap(f, p, x, b, attr, target=1) -> float:
    with torch.no_grad():
        delta = f(p, x)[:, target] - f(p, b)[:, target]
    return float((attr.flatten(1).sum(1) - delta).abs().max() / delta.abs().max())


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize("name", MODELS)
def test_deeplift_is_exact_on_transformers(name: str, dtype: torch.dtype, rtol: float) -> None:
    model, shape = build(name)
    model = model.to(dtype).eval()
    f, p = ax.functionalize(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=dtype)
    b = 0.5 * torch.randn(shape, generator=g, dtype=dtype)  # a random baseline
    attr = ax.deeplift(f, p, x, 1, baseline=b)
    assert attr.shape == x.shape and attr.dtype == dtype
    assert relative_gap(f, p, x, b, attr) <= rtol


@pytest.mark.parametrize("name", ["gpt2", "llama", "torch_encoder", "swiglu"])
def test_deeplift_batch_invariance_on_transformers(name: str) -> None:
    model, shape = build(name)
    f, p = ax.functionalize(model.double().eval())
    g = torch.Generator().manual_seed(4)
    x, b = torch.randn(shape, generator=g, dtype=D), torch.randn(shape, generator=g, dtype=D)
    together = ax.deeplift(f, p, x, 2, baseline=b)
    for i in range(shape[0]):
        alone = ax.deeplift(f, p, x[i : i + 1], 2, baseline=b[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-9, atol=1e-12)


def test_deeplift_shap_on_gpt2() -> None:
    model, shape = build("gpt2")
    f, p = ax.functionalize(model.double().eval())
    g = torch.Generator().manual_seed(5)
    x, refs = torch.randn(shape, generator=g, dtype=D), torch.randn((4, *shape[1:]), generator=g, dtype=D)
    attr = ax.deeplift_shap(f, p, x, 1, refs, chunk_size=2)
    with torch.no_grad():
        delta = f(p, x)[:, 1] - f(p, refs)[:, 1].mean()
    torch.testing.assert_close(attr.flatten(1).sum(1), delta, rtol=1e-8, atol=1e-10)


def test_decomposed_forward_equals_the_fused_ops() -> None:
    from attrax import _decompose as dec

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 8, generator=g, dtype=D)
    w, b = torch.rand(8, generator=g, dtype=D), torch.randn(8, generator=g, dtype=D)
    torch.testing.assert_close(dec.layer_norm(x, (8,), w, b, 1e-5), F.layer_norm(x, (8,), w, b, 1e-5))
    torch.testing.assert_close(dec.rms_norm(x, (8,), w, 1e-6), F.rms_norm(x, (8,), w, 1e-6))
    img = torch.randn(2, 6, 3, 3, generator=g, dtype=D)
    gw, gb = torch.rand(6, generator=g, dtype=D), torch.randn(6, generator=g, dtype=D)
    torch.testing.assert_close(dec.group_norm(img, 3, gw, gb, 1e-5), F.group_norm(img, 3, gw, gb, 1e-5))
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g, dtype=D) for _ in range(3))
    mask = torch.rand(5, 5, generator=g) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    additive = torch.randn(2, 1, 5, 5, generator=g, dtype=D)
    sdpa = F.scaled_dot_product_attention
    for kw in ({}, {"is_causal": True}, {"attn_mask": mask}, {"attn_mask": additive}, {"scale": 0.3}):
        torch.testing.assert_close(dec.scaled_dot_product_attention(q, k, v, **kw), sdpa(q, k, v, **kw))
    kv = torch.randn(2, 2, 5, 8, generator=g, dtype=D)
    torch.testing.assert_close(dec.scaled_dot_product_attention(q, kv, kv, enable_gqa=True),
                               sdpa(q, kv, kv, enable_gqa=True))
    m1, m2, bias = torch.randn(3, 4, dtype=D), torch.randn(4, 5, dtype=D), torch.randn(5, dtype=D)
    torch.testing.assert_close(dec.addmm(bias, m1, m2), torch.addmm(bias, m1, m2))
    torch.testing.assert_close(dec.addmm(bias, m1, m2, beta=0.5, alpha=2), torch.addmm(bias, m1, m2, beta=0.5, alpha=2))


LOADER = r"""
import sys
sys.modules["attrax"] = None  # the exported program must not need attrax
import torch
prog = torch.export.load(sys.argv[1]).module()
calls = torch.load(sys.argv[2], weights_only=True)
print(max(float((prog(*args) - ref).abs().max()) for args, ref in calls))
"""


def test_deeplift_on_gpt2_under_vmap_compile_and_export(tmp_path) -> None:
    import subprocess
    import sys

    model, shape = build("gpt2")
    f, p = ax.functionalize(model.eval())
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g)
    targets = torch.tensor([1, 4, 9])
    per_target = torch.func.vmap(lambda t: ax.deeplift(f, p, x, t))(targets)
    for k, t in enumerate(targets.tolist()):
        torch.testing.assert_close(per_target[k], ax.deeplift(f, p, x, t), rtol=1e-5, atol=1e-6)
    explain = ax.compile(ax.deeplift, f, p, backend="eager")
    torch.testing.assert_close(explain(x, 4), ax.deeplift(f, p, x, 4), rtol=1e-5, atol=1e-6)
    prog = ax.export(ax.deeplift, f, p, x, torch.full((shape[0],), 4))
    torch.export.save(prog, tmp_path / "gpt2.pt2")
    calls = []
    for batch in (2, 5):
        xb = torch.randn(batch, *shape[1:], generator=g)
        tb = torch.randint(0, 40, (batch,), generator=g)
        calls.append(((xb, tb), ax.deeplift(f, p, xb, tb)))
    torch.save(calls, tmp_path / "calls.pt")
    (tmp_path / "load.py").write_text(LOADER)
    r = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "gpt2.pt2"), str(tmp_path / "calls.pt")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-5


class ConvNeXtStack(nn.Module):
    """A stem conv, then LayerNorm2d and ConvNeXt blocks: from a zero image every LayerNorm sees a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = LayerNorm2d(8)
        self.blocks = nn.Sequential(*(ConvNeXtBlockBody() for _ in range(4)))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.blocks(self.norm(self.stem(x)))
        return self.head(F.layer_norm(h.mean((2, 3)), (8,)))


class ConvNeXtBlockBody(ConvNeXtBlock):
    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h)))) * self.gamma
        return x + h.permute(0, 3, 1, 2)


def test_deeplift_float32_from_a_constant_reference_through_layer_norms() -> None:
    # the symmetric split of c * rsqrt(var + eps) cancels terms of size c * eps^-1/2 when the reference
    # is constant along the normalised dims (torchvision's ConvNeXt from a zero image: -8e4 for 0.1)
    torch.manual_seed(0)
    model = ConvNeXtStack().eval()
    f, p = ax.functionalize(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    b = torch.zeros_like(x)
    attr = ax.deeplift(f, p, x, 1, baseline=b)
    assert relative_gap(f, p, x, b, attr) <= 1e-4
