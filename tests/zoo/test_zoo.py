"""Model-zoo coverage: torchvision, timm and transformers models, random-initialised.

Skipped unless torchvision, timm and transformers are installed (see README, "Model zoo").
Each (model, method) cell checks what the method promises: completeness for IG, DeepLift and
DeepLiftShap, finite relevance for LRP (epsilon_plus_flat, canonized; models have biases, so
conservation is not exact), the shape of Grad-CAM; or, for an operation the method has no rule
for, that it raises the clear error naming the op. With ``ATTRAX_ZOO_REPORT=path`` the outcomes
are written as JSON for the README table.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import attrax as ax  # noqa: E402

pytestmark = pytest.mark.zoo

SIZE = int(os.environ.get("ATTRAX_ZOO_SIZE", "64"))
RESULTS: dict[str, dict[str, str]] = {}


class HFImage(torch.nn.Module):
    """A transformers image classifier returning plain logits."""

    def __init__(self) -> None:
        super().__init__()
        cfg = transformers.ViTConfig(image_size=SIZE, patch_size=16, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, num_labels=10)
        self.model = transformers.ViTForImageClassification(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _text(kind: str) -> torch.nn.Module:
    """A transformers text model with 10 outputs: a classifier, or an LM's next-token logits (vocab 10)."""
    common = dict(vocab_size=10, max_position_embeddings=32)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=10,
                                                                     n_positions=32))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            **common))
    else:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, num_labels=10, **common))
    return model


#: text models: (embedding layer, output selection); x is the embedding of 12 random tokens
TEXT = {
    "hf_gpt2": ("transformer.wte", lambda out: out.logits[:, -1]),
    "hf_llama": ("model.embed_tokens", lambda out: out.logits[:, -1]),
    "hf_bert": ("bert.embeddings.word_embeddings", "logits"),
}

MODELS = {
    "resnet18": (lambda: tv.models.resnet18(num_classes=10), "layer4"),
    "resnet50": (lambda: tv.models.resnet50(num_classes=10), "layer4"),
    "vgg16_bn": (lambda: tv.models.vgg16_bn(num_classes=10), "features.42"),
    "densenet121": (lambda: tv.models.densenet121(num_classes=10), "features.denseblock4"),
    "mobilenet_v3_small": (lambda: tv.models.mobilenet_v3_small(num_classes=10), "features.12"),
    "efficientnet_b0": (lambda: tv.models.efficientnet_b0(num_classes=10), "features.8"),
    "convnext_tiny": (lambda: tv.models.convnext_tiny(num_classes=10), "features.7"),
    "vit_b_16": (lambda: tv.models.vit_b_16(num_classes=10, image_size=SIZE), None),
    "swin_t": (lambda: tv.models.swin_t(num_classes=10), ("features.7", -1)),  # channels-last stages
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=10), "layer4"),
    "hf_vit_tiny": (HFImage, None),
    "hf_gpt2": (lambda: _text("gpt2"), None),
    "hf_llama": (lambda: _text("llama"), None),
    "hf_bert": (lambda: _text("bert"), None),
}
METHODS = ["gradient", "integrated_gradients", "deeplift", "deeplift_shap", "lrp_epsilon_plus_flat", "grad_cam"]


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def zoo():
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model = _randomize_bn(MODELS[name][0]()).eval()
            if name in TEXT:
                embedding, output = TEXT[name]
                f, p = ax.functionalize(model, output=output, embedding=embedding)
                with torch.no_grad():
                    x = f.embed(p, torch.randint(0, 10, (2, 12), generator=torch.Generator().manual_seed(0)))
            else:
                f, p = ax.functionalize(model)
                x = torch.randn(2, 3, SIZE, SIZE)
            t = torch.tensor([1, 7])
            cache[name] = (model, f, p, x, t)
        return cache[name]

    yield get
    out = os.environ.get("ATTRAX_ZOO_REPORT")
    if out:
        merged = {}
        if os.path.exists(out):
            with open(out) as fh:
                merged = json.load(fh).get("results", {})
        for k, v in RESULTS.items():
            merged.setdefault(k, {}).update(v)
        info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "torchvision": tv.__version__,
                "timm": timm.__version__, "transformers": transformers.__version__,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU", "input": f"2x3x{SIZE}x{SIZE}"}
        with open(out, "w") as fh:
            json.dump({"machine": info, "results": merged}, fh, indent=2)


def _span(f, p, x, t, b):
    with torch.no_grad():
        return (f(p, x).gather(1, t[:, None]) - f(p, b).gather(1, t[:, None]))[:, 0]


def _record(name: str, method: str, text: str) -> None:
    RESULTS.setdefault(name, {})[method] = text


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_zoo(zoo, name, method):
    model, f, p, x, t = zoo(name)
    b = torch.zeros_like(x)
    start = time.perf_counter()
    try:
        if method == "gradient":
            a = ax.gradient(f, p, x, t)
            assert a.shape == x.shape and torch.isfinite(a).all()
            note = "ok"
        elif method == "integrated_gradients":
            # a noise baseline: with an all-zero image every LayerNorm (ConvNeXt, ViT) sees a constant input
            # and the output jumps within alpha ~ sqrt(eps) of the baseline, which no quadrature resolves
            b = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 0.1
            a = ax.integrated_gradients(f, p, x, t, baseline=b, n_steps=32, chunk_size=8)
            span = _span(f, p, x, t, b)
            with torch.no_grad():
                scale = f(p, x).abs().amax(1)  # random-init nets can be almost constant: |span| ~ 1e-7
            gap = float(((a.flatten(1).sum(1) - span).abs() / (span.abs() + 1e-3 * scale + 1e-6)).max())
            assert gap < 0.2, gap  # 32 steps through ReLU kinks (notes/decisions.md)
            note = f"ok, gap {gap:.1e}"
        elif method == "deeplift":
            a = ax.deeplift(f, p, x, t)
            gap = float(((a.flatten(1).sum(1) - _span(f, p, x, t, b)).abs() / _span(f, p, x, t, b).abs().clamp(min=1)).max())
            assert gap < 1e-3, gap  # float32 through deep nets
            note = f"ok, gap {gap:.1e}"
        elif method == "deeplift_shap":
            bl = torch.randn(3, *x.shape[1:]) * 0.1
            a = ax.deeplift_shap(f, p, x, t, bl, chunk_size=1)
            with torch.no_grad():
                span = f(p, x).gather(1, t[:, None])[:, 0] - f(p, bl)[:, t].mean(0)
            gap = float(((a.flatten(1).sum(1) - span).abs() / span.abs().clamp(min=1)).max())
            assert gap < 1e-3, gap
            note = f"ok, gap {gap:.1e}"
        elif method == "lrp_epsilon_plus_flat":
            a = ax.lrp(f, p, x, t, composite=ax.composites.epsilon_plus_flat())
            assert a.shape == x.shape and torch.isfinite(a).all()
            with torch.no_grad():
                score = f(p, x).gather(1, t[:, None])[:, 0]
            if bool((score.abs() < 1e-12).all()):
                note = "ok, score 0 (zero-initialised head)"
            else:
                note = f"ok, sum/score {float((a.flatten(1).sum(1) / score).mean()):.2f}"
        else:
            layer = MODELS[name][1]
            if layer is None:
                _record(name, method, "n/a (no conv layer)" if name not in TEXT else "n/a (text)")
                return
            layer, channel_dim = layer if isinstance(layer, tuple) else (layer, None)
            cam = ax.layer.grad_cam(f, p, x, t, layer, channel_dim=channel_dim)
            assert cam.shape[0] == 2 and torch.isfinite(cam).all()
            note = "ok"
    except ValueError as e:
        msg = str(e)
        # the promised behaviour for unsupported operations: a clear error naming the op
        assert "has no rule for aten." in msg or "could not trace" in msg, msg
        op = msg.split("has no rule for ")[1].split(" ")[0] if "has no rule for" in msg else "untraceable"
        _record(name, method, f"clear error: {op.replace('aten.', '').replace('.default', '')}")
        return
    _record(name, method, f"{note} ({time.perf_counter() - start:.1f}s)")
