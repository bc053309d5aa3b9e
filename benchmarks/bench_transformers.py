"""Transformers: AttnLRP vs LXT's efficient AttnLRP, and gradient x input / DeepLift / IG, on HF LMs.

    python benchmarks/bench_transformers.py [--rounds N] [--threads N] [--quick]

Models: a Llama-style (RMSNorm, rotary attention, SwiGLU) and a GPT-2-style (LayerNorm, GELU MLP,
``Conv1D``) HF causal LM from tiny configs (random weights, HF's defaults: ``sdpa`` attention,
``use_cache=True``), functionalized as ``ax.functionalize(model, output=lambda o: o.logits[:, -1],
embedding=...)`` with ``x = model_fn.embed(params, ids)``; the target is one token of the last
position's logits per sample.

* CPU: 4 layers, hidden 128, 4 heads, vocab 1024, batch 2 x seq 128 (timing), and batch 1 x seq
  1024 (long sequence: peak memory, and time). CUDA (when available): 8 layers, hidden 512, 8
  heads, vocab 8192, batch 8 x seq 512, and batch 1 x seq 4096.
* Time: ratio to one forward + input-gradient pass of the HF module on the same embeddings (the
  unit of every benchmark here), each method timed interleaved with that pass alone
  (``paired_ratios``). Peak memory: the allocator's peak of live tensor bytes during one call
  (``_common.peak_memory``: CUDA's ``max_memory_allocated``; on CPU the profiler's allocation events,
  which count every tensor torch's CPU allocator hands out; tracemalloc does not see them).
* LXT (``lxt.efficient``, AttnLRP patch maps ``models.llama.attnLRP`` / ``models.gpt2.attnLRP``):
  its patches replace methods of HF classes and ``torch.nn.LayerNorm`` process-wide, so every LXT
  call applies them and undoes them on return (``lxt_patched``); the undo is checked (the base's
  gradient is bitwise unchanged afterwards). LXT's recipe is ``x.grad * x`` after one backward;
  here ``torch.autograd.grad`` w.r.t. the embeddings alone (as for the base: no weight gradients).
  Its relevance is compared with attrax's AttnLRP (max |diff| / max |attrax|). LXT's efficient mode puts no
  stabiliser on linear layers and residual sums, so it computes attrax's ``attn_lrp(epsilon=0)`` (timed as
  ``attn_lrp_eps0``, ratio ``x_lxt``); the default ε = 1e-6 costs three elementwise passes per such site.
* attrax's ``lrp`` runs a head whose output is only read at selected rows on those rows
  (``rewrite.select_before_linear``: here the vocabulary head at the last position), while HF (the base) and
  LXT map every position to the vocabulary; ``attn_lrp_all_positions`` is the same relevance with the
  selection moved into a callable target, so the head runs on every position as theirs does (informational).
* ``ax.lm.generation(ax.integrated_gradients, ...)`` for 16 new tokens (one vmapped call) against
  16 separate ``ax.integrated_gradients`` calls with ``ax.lm.next_token`` targets, on an
  ``output="logits"`` model of the same weights (batch 1, seq 128; IG n_steps=32), both timed
  interleaved round by round.

``ax.composites.attn_lrp`` is benchmarked when present (it is recorded as absent otherwise).
CPU runs default to one intra-op thread (``--threads 0``: torch's default): on the shared 2-core
machine (load average ~8) torch's two OpenMP threads spun against other processes, and one forward +
backward of the Llama config took 0.36-1.9 s with two threads against 57-90 ms with one. The thread
count is recorded (``cpu_threads``) with the load average at the start.
HF's ``use_cache`` is left at its default (True): with ``use_cache=False`` (no cache, position ids
present) HF builds a packed-sequence mask under ``torch.vmap``, which attrax's tracer refuses
(``UnsupportedOperation``) for the LRP/DeepLift programs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import os
import sys
import time
import types
import warnings
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import attrax as ax  # noqa: E402
from _common import paired_ratios, peak_memory, timeit, write  # noqa: E402

EMBEDDING = {"llama": "model.embed_tokens", "gpt2": "transformer.wte"}
LXT_MODULES = ("patches", "models.gpt2", "models.llama")


# ----------------------------------------------------------------------------------- models


def build(kind: str, hidden: int, layers: int, heads: int, vocab: int, max_len: int, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=max_len)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_len)
        model = GPT2LMHeadModel(cfg)
    return model.to(device).eval()


def describe(model) -> dict:
    c = model.config
    return {"class": type(model).__name__, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "heads": c.num_attention_heads, "vocab": c.vocab_size, "attn_implementation": c._attn_implementation,
            "parameters": sum(p.numel() for p in model.parameters())}


def fwd_bwd(module, x, t):
    """One forward and one gradient w.r.t. the input embeddings: the unit all ratios refer to."""

    def run():
        xx = x.detach().requires_grad_()
        out = module(inputs_embeds=xx).logits[:, -1]
        (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), xx)
        return g

    return run


# -------------------------------------------------------------------------------------- LXT


def lxt_modules():
    """LXT's efficient-mode patch modules. ``lxt.efficient``'s package ``__init__`` imports torchvision
    (for its torchvision-ViT map); where that is missing the packages are entered without their
    ``__init__`` (as tests/test_lrp_transformers.py does), so only the patch modules are loaded."""
    try:
        import lxt.efficient  # noqa: F401

        return {m: importlib.import_module(f"lxt.efficient.{m}") for m in LXT_MODULES}, None
    except ImportError as e:
        note = f"lxt.efficient's __init__ failed ({type(e).__name__}: {e}); patch modules loaded without it"
    import lxt

    root = os.path.join(os.path.dirname(lxt.__file__), "efficient")
    packages = {}
    for name, path in (("lxt.efficient", root), ("lxt.efficient.models", os.path.join(root, "models"))):
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        packages[name] = pkg
    with mock.patch.dict(sys.modules, packages):
        return {m: importlib.import_module(f"lxt.efficient.{m}") for m in LXT_MODULES}, note


@contextlib.contextmanager
def lxt_patched(patch_map):
    """Apply an LXT patch map (``lxt.efficient.monkey_patch`` does ``patch(target)`` for every entry; the
    patches replace class methods and module attributes process-wide) and undo it on exit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    saved = []
    for target in patch_map:
        if isinstance(target, type):
            names = ("forward", "original_forward")
            saved.append((target, {k: target.__dict__[k] for k in names if k in target.__dict__}))
        else:  # a Python module: its attention functions are replaced
            saved.append((target, dict(vars(target))))
    local = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for target, patch in patch_map.items():
                if not patch(target):
                    raise RuntimeError(f"LXT could not patch {target}")
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


def lxt_attn_lrp(module, patch_map, x, t):
    def run():
        with lxt_patched(patch_map):
            xx = x.detach().requires_grad_()
            out = module(inputs_embeds=xx).logits[:, -1]
            (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), xx)
        return xx.detach() * g

    return run


# ----------------------------------------------------------------------------------- runs


def mb(n: int) -> float:
    return n / 2**20


def fmt(row: dict) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def methods(model_fn, params, x, t, *, full: bool):
    fns = {"input_x_gradient": lambda: ax.input_x_gradient(model_fn, params, x, t)}
    if hasattr(ax.composites, "attn_lrp"):
        comp, comp0 = ax.composites.attn_lrp(), ax.composites.attn_lrp(epsilon=0.0)
        fns["attn_lrp"] = lambda: ax.lrp(model_fn, params, x, t, composite=comp)
        # LXT's efficient mode has no stabiliser on linear layers and residual sums: the same computation as
        # attn_lrp(epsilon=0) (to 1.5e-7); the default epsilon = 1e-6 adds three elementwise passes per such site
        fns["attn_lrp_eps0"] = lambda: ax.lrp(model_fn, params, x, t, composite=comp0)
    if full:
        fns["deeplift"] = lambda: ax.deeplift(model_fn, params, x, t)
        fns["integrated_gradients_32"] = lambda: ax.integrated_gradients(model_fn, params, x, t, n_steps=32)
    return fns


def run_shape(name, kind, module, lxt, batch, seq, rounds, *, full: bool):
    device = next(module.parameters()).device
    model_fn, params = ax.functionalize(module, output=lambda o: o.logits[:, -1], embedding=EMBEDDING[kind])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, module.config.vocab_size, (batch, seq), generator=g).to(device)
    t = torch.randint(0, module.config.vocab_size, (batch,), generator=g).to(device)
    with torch.no_grad():
        x = model_fn.embed(params, ids)
    base = fwd_bwd(module, x, t)
    reference = base()
    fns = methods(model_fn, params, x, t, full=full)
    if "attn_lrp" in fns:
        # the head on every position, as HF (the base) and LXT compute it: attn_lrp's own call moves the head after
        # the selection of the last position (rewrite.select_before_linear); this is the same relevance with the
        # selection in a callable target instead, so the head maps all positions (informational, no target)
        all_fn, _ = ax.functionalize(module, output="logits", embedding=EMBEDDING[kind])
        comp = ax.composites.attn_lrp()
        last = lambda o: o[:, -1].gather(1, t[:, None])[:, 0]  # noqa: E731
        fns["attn_lrp_all_positions"] = lambda: ax.lrp(all_fn, params, x, last, composite=comp)
    rows: dict = {}
    outs = {}
    for mname, fn in fns.items():
        start = time.perf_counter()
        outs[mname] = fn()  # traces once (memoised on model_fn), as a served model would
        rows[mname] = {"first_call_s": time.perf_counter() - start}
    if lxt is not None:
        patch_map = lxt[f"models.{kind}"].attnLRP
        fns["lxt_attn_lrp"] = lxt_attn_lrp(module, patch_map, x, t)
        rows["lxt_attn_lrp"] = {}
        try:
            outs["lxt_attn_lrp"] = fns["lxt_attn_lrp"]()
            if not torch.equal(base(), reference):
                raise RuntimeError("LXT's patches outlived their context: the base gradient changed")
        except Exception as e:
            rows["lxt_attn_lrp"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            del fns["lxt_attn_lrp"]
    ratios = paired_ratios(base, fns, device, rounds=rounds)
    base_times = timeit({"base": base}, device, rounds=max(3, rounds // 2), warmup=1)
    peak_base = mb(peak_memory(base, device))
    for mname, fn in fns.items():
        rows[mname]["x_fwd_bwd"] = ratios[mname]
        rows[mname]["peak_mb"] = mb(peak_memory(fn, device))
        rows[mname]["peak_x_fwd_bwd"] = rows[mname]["peak_mb"] / peak_base
    if "attn_lrp" in outs and "lxt_attn_lrp" in outs:
        a, b = outs["attn_lrp"].float(), outs["lxt_attn_lrp"].float()
        rows["attn_lrp"]["max_rel_diff_to_lxt"] = float((a - b).abs().max() / a.abs().max())
        rows["attn_lrp"]["x_lxt"] = ratios["attn_lrp"] / ratios["lxt_attn_lrp"]
        # LXT's efficient mode is attrax's rules at epsilon = 0 (the default 1e-6 moves small relevances)
        a0 = outs["attn_lrp_eps0"].float()
        rows["attn_lrp"]["max_rel_diff_to_lxt_eps0"] = float((a0 - b).abs().max() / a0.abs().max())
        rows["attn_lrp_eps0"]["max_rel_diff_to_lxt"] = rows["attn_lrp"]["max_rel_diff_to_lxt_eps0"]
        rows["attn_lrp_eps0"]["x_lxt"] = ratios["attn_lrp_eps0"] / ratios["lxt_attn_lrp"]
        if "attn_lrp_all_positions" in outs:
            rows["attn_lrp_all_positions"]["x_lxt"] = ratios["attn_lrp_all_positions"] / ratios["lxt_attn_lrp"]
            a1 = outs["attn_lrp_all_positions"].float()
            rows["attn_lrp_all_positions"]["max_rel_diff_to_attn_lrp"] = float((a1 - a).abs().max() / a.abs().max())
    for mname, row in rows.items():
        print(f"{name:6s} {batch}x{seq:<5d} {mname:24s} {fmt(row)}", flush=True)
    return {"batch": batch, "seq": seq, "fwd_bwd_ms": 1e3 * base_times["base"], "peak_mb_fwd_bwd": peak_base,
            "methods": rows}


def run_generation(name, kind, module, n_new, seq, n_steps, rounds):
    """One ``ax.lm.generation`` call for ``n_new`` tokens vs ``n_new`` separate IG calls (same rows)."""
    device = next(module.parameters()).device
    model_fn, params = ax.functionalize(module, output="logits", embedding=EMBEDDING[kind])
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, module.config.vocab_size, (1, seq), generator=g).to(device)
    with torch.no_grad():
        x = model_fn.embed(params, ids)
    start = seq - n_new
    new = ids[:, start:]

    def together():
        return ax.lm.generation(ax.integrated_gradients, model_fn, params, x, new, start=start, n_steps=n_steps)

    def separate():
        rows = [ax.integrated_gradients(model_fn, params, x, ax.lm.next_token(new[:, k], start + k - 1),
                                        n_steps=n_steps).sum(-1) for k in range(n_new)]
        return torch.stack(rows, 1)

    a, b = together(), separate()
    times = timeit({"generation": together, "separate": separate}, device, rounds=rounds, warmup=0)
    row = {"n_new": n_new, "seq": seq, "batch": 1, "n_steps": n_steps,
           "generation_s": times["generation"], "separate_s": times["separate"],
           "generation_x_separate": times["generation"] / times["separate"],
           "max_rel_diff": float((a - b).abs().max() / b.abs().max()),
           "peak_mb_generation": mb(peak_memory(together, device)),
           "peak_mb_separate_one_call": mb(peak_memory(
               lambda: ax.integrated_gradients(model_fn, params, x, ax.lm.next_token(new[:, 0], start - 1),
                                               n_steps=n_steps), device))}
    print(f"{name:6s} generation {fmt(row)}", flush=True)
    return row


def targets(results: dict) -> dict:
    """The issue's targets (16.5, 17) against this run's numbers: ``[value, bound, holds]``."""
    out: dict = {}

    def check(name, value, bound):
        if value is not None:
            out[name] = [round(value, 3), bound, bool(value <= bound)]

    for kind, entry in results.items():
        main_rows = entry["main"]["methods"]
        check(f"{kind}: attn_lrp / fwd+bwd", main_rows.get("attn_lrp", {}).get("x_fwd_bwd"), 1.5)
        check(f"{kind}: attn_lrp / lxt", main_rows.get("attn_lrp", {}).get("x_lxt"), 1.0)
        check(f"{kind}: attn_lrp(epsilon=0) / lxt (no epsilon, as LXT)",
              main_rows.get("attn_lrp_eps0", {}).get("x_lxt"), 1.0)
        check(f"{kind}: attn_lrp with the head on every position / lxt (info)",
              main_rows.get("attn_lrp_all_positions", {}).get("x_lxt"), 1.0)
        check(f"{kind}: deeplift / fwd+bwd", main_rows.get("deeplift", {}).get("x_fwd_bwd"), 2.5)
        if "long" in entry:
            long_rows = entry["long"]["methods"]
            check(f"{kind}: attn_lrp peak / fwd+bwd peak (seq {entry['long']['seq']})",
                  long_rows.get("attn_lrp", {}).get("peak_x_fwd_bwd"), 1.2)
        if "generation" in entry:
            check(f"{kind}: generation / {entry['generation']['n_new']} calls",
                  entry["generation"]["generation_x_separate"], 0.5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (CPU default 1, CUDA default torch's; 0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="few rounds, no long sequence or generation (smoke test)")
    args = ap.parse_args()
    threads = args.threads if args.threads is not None else (0 if torch.cuda.is_available() else 1)
    if threads:
        torch.set_num_threads(threads)
    load = os.getloadavg()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        lxt, lxt_note = lxt_modules()
        from importlib.metadata import version

        lxt_info = {"version": version("lxt"), "maps": "models.llama.attnLRP / models.gpt2.attnLRP"}
        if lxt_note:
            lxt_info["note"] = lxt_note
    except Exception as e:  # pragma: no cover - peer missing
        lxt, lxt_info = None, {"error": f"{type(e).__name__}: {e}"}
    attn_lrp_present = hasattr(ax.composites, "attn_lrp")
    print(f"attn_lrp present: {attn_lrp_present}; LXT: {lxt_info}", flush=True)
    rounds = 3 if args.quick else args.rounds
    if torch.cuda.is_available():
        device = torch.device("cuda")
        arch = dict(hidden=512, layers=8, heads=8, vocab=8192)
        main_shape, long_shape, gen = (8, 512), (1, 4096), (16, 256)
    else:
        device = torch.device("cpu")
        arch = dict(hidden=128, layers=4, heads=4, vocab=1024)
        main_shape, long_shape, gen = (2, 128), (1, 1024), (16, 128)
    results: dict = {}
    for kind in ("llama", "gpt2"):
        module = build(kind, max_len=max(long_shape[1], main_shape[1]), device=device, **arch)
        entry: dict = {"config": describe(module)}
        entry["main"] = run_shape(kind, kind, module, lxt, *main_shape, rounds, full=True)
        if not args.quick:
            entry["long"] = run_shape(kind, kind, module, lxt, *long_shape, max(3, rounds // 2), full=False)
            entry["generation"] = run_generation(kind, kind, module, gen[0], gen[1], 32, max(2, rounds // 4))
        results[kind] = entry
    checks = targets(results)
    for k, v in checks.items():
        print(f"{k}: {v}")
    if args.quick:
        return
    write("transformers", {"load_average_at_start": list(load), "targets": checks,
        "unit": "time ratio to one forward + input-gradient pass of the HF module (paired rounds); peak MB of live "
                "tensors (CPU: profiler allocation events)",
        "attn_lrp_present": attn_lrp_present, "lxt": lxt_info, "models": results})


if __name__ == "__main__":
    main()
