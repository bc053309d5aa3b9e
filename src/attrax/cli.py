"""The ``attrax`` command line: ``attrax demo``, ``attrax explain`` and ``attrax explain-dataset``.

``attrax explain`` loads a model (``package.module:factory`` with optional ``--weights``, or a
``torch.export`` ``.pt2`` file), reads inputs (PNG/JPEG images, ``.npy``, ``.pt``), runs one method
with ``--opt key=value`` options, and writes for each input a heatmap PNG, an overlay PNG (for 2-d
inputs) and the raw attributions (``.npy``). Any bad argument ends with one line on stderr and exit
code 2, never a traceback (``--debug`` shows it).

``attrax explain-dataset`` attributes a whole map-style dataset (``package.module:factory``, or a
``.pt`` file holding ``{"x": tensor, "target": tensor}``) into a resumable on-disk store (see
:mod:`attrax.distributed`); run it under ``torchrun --nproc-per-node N -m attrax explain-dataset ...``
to shard it over N processes.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


class UsageError(Exception):
    """A bad argument: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        _fail(f"{self.prog}: error: {message}")


def _fail(message: str) -> NoReturn:
    sys.stderr.write(" ".join(message.split()) + "\n")
    raise SystemExit(2)


# ----------------------------------------------------------------------------- methods


def _methods() -> dict[str, Any]:
    import attrax as ax

    return {
        "gradient": ax.gradient,
        "saliency": ax.saliency,
        "input_x_gradient": ax.input_x_gradient,
        "integrated_gradients": ax.integrated_gradients,
        "smoothgrad": ax.smoothgrad,
        "gradient_shap": ax.gradient_shap,
        "deeplift": ax.deeplift,
        "deeplift_shap": ax.deeplift_shap,
        "guided_backprop": ax.guided_backprop,
        "deconvnet": ax.deconvnet,
        "lrp": ax.lrp,
        "occlusion": ax.occlusion,
        "feature_ablation": ax.feature_ablation,
        "shapley_sampling": ax.shapley_sampling,
        "kernel_shap": ax.kernel_shap,
        "lime": ax.lime,
        "grad_cam": ax.layer.grad_cam,
        "guided_grad_cam": ax.layer.guided_grad_cam,
    }


def parse_value(text: str) -> Any:
    """``--opt`` values: Python literals (ints, floats, tuples, True/False/None), ``3,4,4`` as a tuple, else a string.

    Options the method annotates as ``str`` (a ``layer`` path such as ``0`` or ``features.3``, a
    mode name) bypass this and get the text as written, see :func:`_options`.
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if "," in text:
        return tuple(parse_value(part) for part in text.split(","))
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    return text


def _options(opts: list[str], method: Any, name: str) -> dict[str, Any]:
    import attrax as ax

    params = inspect.signature(method).parameters
    out: dict[str, Any] = {}
    for opt in opts:
        if "=" not in opt:
            raise UsageError(f"--opt expects key=value, got {opt!r}")
        key, text = opt.split("=", 1)
        key = key.strip()
        if key not in params or params[key].kind not in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) \
                or key in ("model_fn", "params", "x", "target"):
            allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY or p in ("layer", "baselines")]
            raise UsageError(f"method {name} has no option {key!r}; options: {', '.join(allowed)}")
        # a str option keeps its text: `layer=0` is the module path "0", not the int 0
        value = text.strip() if params[key].annotation in (str, "str") else parse_value(text)
        if key == "composite" and isinstance(value, str):
            factory = getattr(ax.composites, value, None)
            if factory is None or not callable(factory) or value.startswith("_"):
                raise UsageError(f"unknown composite {value!r}; e.g. epsilon_plus, epsilon_plus_flat, epsilon_gamma_box")
            value = factory()
        if key in ("baselines", "feature_mask") and isinstance(value, str):
            value = _load_tensor(Path(value), batch=False)
            if key == "feature_mask":
                value = value.long()
        out[key] = value
    return out


# ------------------------------------------------------------------------------ inputs


def _factory(spec: str, option: str, alternative: str) -> Any:
    """The callable named by ``package.module:factory`` (the working directory is importable)."""
    if ":" not in spec:
        raise UsageError(f"{option} must be 'package.module:factory' or {alternative}, got {spec!r}")
    module_name, factory_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise UsageError(f"cannot import {module_name!r} for {option}: {e}") from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"{module_name} has no callable {factory_name!r} for {option}")
    return factory


def _load_model(spec: str, weights: str | None) -> Any:
    import torch

    if spec.endswith(".pt2"):
        if not os.path.exists(spec):
            raise UsageError(f"cannot read model file {spec!r}: no such file")
        try:
            return torch.export.load(spec).module()
        except Exception as e:
            raise UsageError(f"cannot load exported program {spec!r}: {e}") from e
    model = _factory(spec, "--model", "a .pt2 file")()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module")
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"cannot read --weights {weights!r}: {e}") from e
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except Exception as e:
            raise UsageError(f"--weights {weights!r} do not fit the model: {e}") from e
    return model.eval()


def _load_tensor(path: Path, batch: bool = False, resize: tuple[int, int] | None = None, gray: bool = False) -> Any:
    import numpy as np
    import torch

    if not path.exists():
        raise UsageError(f"cannot read input {str(path)!r}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in IMAGE_SUFFIXES:
            from PIL import Image

            img = Image.open(path).convert("L" if gray else "RGB")
            if resize is not None:
                img = img.resize((resize[1], resize[0]))
            arr = np.asarray(img, dtype=np.float32) / 255.0
            t = torch.from_numpy(arr.copy())
            return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False)).float()
        if suffix == ".pt":
            value = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(value, torch.Tensor):
                raise UsageError(f"{str(path)!r} holds a {type(value).__name__}, expected a tensor")
            return value.float()
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot read input {str(path)!r}: {type(e).__name__}: {e}") from e
    raise UsageError(f"unsupported input {str(path)!r}: use an image ({', '.join(IMAGE_SUFFIXES)}), .npy or .pt")


def _pair(text: str | None, name: str, kind: type = int) -> tuple[Any, ...] | None:
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{name} expects comma-separated numbers, got {text!r}") from None


# ------------------------------------------------------------------------------ explain


def explain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import attrax as ax

    methods = _methods()
    if args.method not in methods:
        raise UsageError(f"unknown method {args.method!r}; choose from {', '.join(methods)}")
    method = methods[args.method]
    options = _options(args.opt, method, args.method)
    resize = _pair(args.resize, "--resize")
    if resize is not None and len(resize) != 2:
        raise UsageError(f"--resize expects H,W, got {args.resize!r}")
    normalize = None if args.normalize is None else _normalization(args.normalize)
    model = _load_model(args.model, args.weights)
    paths = [Path(p) for p in args.input]
    samples = [_load_tensor(p, resize=resize, gray=args.gray) for p in paths]
    shapes = {tuple(s.shape) for s in samples}
    if len(shapes) > 1:
        raise UsageError(f"inputs have different shapes {sorted(shapes)}; pass --resize H,W")
    x = torch.stack(samples)
    if normalize is not None:
        mean, std = normalize
        channels = x.shape[1] if x.ndim > 1 else 1
        if len(mean) not in (1, channels):
            raise UsageError(f"--normalize gives {len(mean)} means and stds for inputs with {channels} channels "
                             f"(shape {tuple(x.shape[1:])}); expected 'mean,std' or one mean and std per channel")
        shape = (1, -1) + (1,) * (x.ndim - 2)
        x = (x - torch.tensor(mean).reshape(shape)) / torch.tensor(std).reshape(shape)
    model_fn, params = ax.functionalize(model)
    try:
        with torch.no_grad():
            out = model_fn(params, x)
    except Exception as e:
        raise UsageError(f"input of shape {tuple(x.shape)} does not fit the model: {str(e).splitlines()[0]}") from e
    target = _target(args.target, out, len(paths))
    try:
        attr = method(model_fn, params, x, target, **options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{args.method}: {str(e).splitlines()[0]}") from e
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    attr = attr.detach()
    for i, path in enumerate(paths):
        stem = f"{path.stem}_{args.method}"
        a = attr[i]
        np.save(out_dir / f"{stem}.npy", a.numpy())
        heat = ax.viz.heatmap(a, sign=args.sign) if a.ndim >= 2 else ax.viz.heatmap(a.reshape(1, -1), sign=args.sign, channel_axis=None)
        ax.viz.save(out_dir / f"{stem}.png", heat)
        if samples[i].ndim == 3:
            ax.viz.save(out_dir / f"{stem}_overlay.png", ax.viz.overlay(samples[i], heat, alpha=args.alpha))
    print(f"wrote {len(paths)} heatmaps to {out_dir}")
    return 0


def _normalization(text: str) -> tuple[list[float], list[float]]:
    """``--normalize``: ``'mean,std'`` or ``'m1,m2,m3;s1,s2,s3'`` -> (means, stds), checked before any loading."""
    expected = f"--normalize expects 'mean,std' or 'm1,m2,m3;s1,s2,s3' (finite numbers, std > 0), got {text!r}"
    try:
        if ";" in text:
            mean_text, std_text = text.split(";")
            mean = [float(v) for v in mean_text.split(",")]
            std = [float(v) for v in std_text.split(",")]
        else:
            mean, std = [[float(v)] for v in text.split(",")]  # exactly two numbers
    except ValueError:  # not numbers, or the wrong number of parts
        raise UsageError(expected) from None
    values = mean + std
    if len(mean) != len(std) or not all(math.isfinite(v) for v in values) or not all(s > 0 for s in std):
        raise UsageError(expected)
    return mean, std


def _load_dataset(spec: str) -> Any:
    import torch

    if spec.endswith(".pt"):
        if not os.path.exists(spec):
            raise UsageError(f"cannot read dataset file {spec!r}: no such file")
        try:
            value = torch.load(spec, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"cannot read dataset file {spec!r}: {e}") from e
        if not (isinstance(value, dict) and isinstance(value.get("x"), torch.Tensor) and isinstance(value.get("target"), torch.Tensor)):
            raise UsageError(f"{spec!r} must hold a dict {{'x': tensor, 'target': tensor}}")
        if len(value["x"]) != len(value["target"]):
            raise UsageError(f"{spec!r}: x has {len(value['x'])} samples but target has {len(value['target'])}")
        return torch.utils.data.TensorDataset(value["x"], value["target"].long())
    return _factory(spec, "--dataset", "a .pt file")()


def explain_dataset(args: argparse.Namespace) -> int:
    import attrax as ax

    methods = _methods()
    if args.method not in methods or args.method in ("grad_cam", "guided_grad_cam"):
        names = [m for m in methods if m not in ("grad_cam", "guided_grad_cam")]
        raise UsageError(f"unknown method {args.method!r} for explain-dataset; choose from {', '.join(names)}")
    method = methods[args.method]
    options = _options(args.opt, method, args.method)
    model = _load_model(args.model, args.weights)
    dataset = _load_dataset(args.dataset)
    model_fn, params = ax.functionalize(model)
    try:
        store = ax.distributed.attribute_dataset(
            method, model_fn, params, dataset, out=args.out, batch_size=args.batch_size, chunk_size=args.chunk_size,
            shard_size=args.shard_size, seed=args.seed, progress=not args.no_progress, model_id=args.model_id,
            dataset_id=args.dataset_id, **options,
        )
    except (TypeError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from e
    if int(os.environ.get("RANK", "0")) == 0:
        state = "complete" if store.complete else f"{len(store.missing)} samples missing"
        print(f"{len(store)} attributions of {store.manifest['n']} samples in {args.out} ({state})")
    return 0


def _target(text: str, out: Any, n: int) -> Any:
    import torch

    if text == "top1":
        return out.argmax(1)
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--target expects an int, 'top1' or one int per input, got {text!r}") from None
    if len(values) not in (1, n):
        raise UsageError(f"--target has {len(values)} values for {n} inputs")
    n_classes = out.shape[1] if out.ndim > 1 else 1
    bad = [v for v in values if not -n_classes <= v < n_classes]
    if bad:
        raise UsageError(f"--target {bad} out of range for model output of shape {tuple(out.shape)} "
                         f"(expected {-n_classes}..{n_classes - 1}; negative counts from the last class)")
    values = [v % n_classes for v in values]  # Python indexing: -1 is the last class
    return values[0] if len(values) == 1 else torch.tensor(values)


# --------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="attrax", description="Attribution for PyTorch models.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", parser_class=_Parser)
    demo = sub.add_parser("demo", help="train a digits CNN (--text: a small transformer on tokens) and explain it "
                                        "with every method", add_help=False)
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    ex = sub.add_parser("explain", help="explain a model on input files")
    ex.add_argument("--model", required=True, help="package.module:factory or an exported .pt2 file")
    ex.add_argument("--weights", help="state dict for the factory's model (torch.save)")
    ex.add_argument("--input", nargs="+", required=True, help="image files, .npy or .pt (one sample each)")
    ex.add_argument("--method", required=True, help="attribution method, e.g. integrated_gradients, lrp, occlusion")
    ex.add_argument("--opt", action="append", default=[], help="method option key=value (repeatable)")
    ex.add_argument("--target", default="top1", help="class index (-1: the last), 'top1', or one index per input (comma-separated)")
    ex.add_argument("--resize", help="H,W for image inputs")
    ex.add_argument("--gray", action="store_true", help="load images with one channel")
    ex.add_argument("--normalize", help="'mean,std' or 'm1,m2,m3;s1,s2,s3' applied after scaling images to [0, 1]")
    ex.add_argument("--sign", default="all", choices=["all", "positive", "negative", "absolute"], help="heatmap sign mode")
    ex.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    ex.add_argument("--out", default="attrax-out", help="output folder")
    ds = sub.add_parser("explain-dataset", help="attribute a whole dataset into a resumable store (torchrun-aware)")
    ds.add_argument("--model", required=True, help="package.module:factory or an exported .pt2 file")
    ds.add_argument("--weights", help="state dict for the factory's model (torch.save)")
    ds.add_argument("--dataset", required=True, help="package.module:factory returning a Dataset of (x, target), or a .pt file {'x','target'}")
    ds.add_argument("--method", required=True, help="attribution method, e.g. integrated_gradients, deeplift, lrp")
    ds.add_argument("--opt", action="append", default=[], help="method option key=value (repeatable)")
    ds.add_argument("--out", required=True, help="store folder (rerun on the same folder to resume)")
    ds.add_argument("--batch-size", type=int, default=64, help="samples per method call")
    ds.add_argument("--chunk-size", type=int, help="passed to the method as chunk_size")
    ds.add_argument("--shard-size", type=int, help="samples per shard file (default 8 x batch size)")
    ds.add_argument("--seed", type=int, help="seed for methods that draw noise (per shard)")
    ds.add_argument("--model-id", help="name the model in the store's manifest instead of a checksum of its weights")
    ds.add_argument("--dataset-id", help="name the dataset in the store's manifest instead of a checksum of a few items")
    ds.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--target -1,0`` -> ``--target=-1,0``: argparse takes a value that starts with '-' for an option
    unless it is one plain negative number."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--target", "--normalize") and re.match(r"-[\d.]", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo has its own parser (argparse remainders drop leading options)
        from .demo import main as demo_main

        return demo_main(argv[1:])
    ap = _parser()
    args = ap.parse_args(_attach_negative_values(argv))
    if args.command is None:
        ap.print_help()
        return 2
    try:
        if args.command == "explain":
            return explain(args)
        if args.command == "explain-dataset":
            return explain_dataset(args)
    except UsageError as e:
        if args.debug:
            raise
        _fail(f"attrax {args.command}: error: {e}")
    except Exception as e:  # never a traceback for the user; --debug shows it
        if args.debug:
            raise
        _fail(f"attrax {args.command}: error: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
