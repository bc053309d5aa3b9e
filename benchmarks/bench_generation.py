"""Generation attribution: ``ax.lm.generation`` for 16 new tokens against 16 separate calls.

    python benchmarks/bench_generation.py [--rounds N] [--threads N] [--quick]

Models: the Llama-style and GPT-2-style HF causal LMs of bench_transformers.py (4 layers, hidden 128,
4 heads, vocab 1024, random weights), functionalized with ``output="logits"`` and the embedding
layer; batch 1, seq 128, the last 16 tokens are the continuation (issue 17, acceptance 3).

* IG (n_steps=32): ``generation`` (``strategy="auto"``, which takes ``"shared"`` for IG: one forward
  of the 32 path points kept, a backward pass through it per row) and ``strategy="vmap"`` against
  16 separate ``ax.integrated_gradients`` calls with ``ax.lm.next_token`` targets.
* AttnLRP (``composite=ax.composites.attn_lrp()``): ``generation`` (``"auto"``, which takes
  ``"vmap"`` for LRP after row 0) against 16 separate ``ax.lrp`` calls.
* The bound of any design that shares the forward and runs one backward per row:
  ``(F + n Bw) / (n (F + Bw))``, with F one forward of the 32 path points (no grad) and F + Bw one
  forward with its input gradient for one target (``torch.autograd.grad``), both timed in the same
  rounds. ``loop`` is that design written by hand (one forward, n backward passes with
  ``retain_graph``): the floor for the shared strategy.
* Each function is called three times before the rounds (its first call's time is kept as ``*_first_s``: a
  method's third call at an input spec traces the program it then reuses). Rounds are paired: every function
  runs once per round, in a rotated order, and each ratio is the median over rounds of that round's time over
  the separate calls' time in the same round.
  ``max_rel_diff`` is max |generation - separate| / max |separate| (the acceptance bound is 1e-6).

CPU runs use one intra-op thread by default (the 2-core machine is shared; see bench_transformers.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import attrax as ax  # noqa: E402
from _common import sync, write  # noqa: E402

EMBEDDING = {"llama": "model.embed_tokens", "gpt2": "transformer.wte"}


def build(kind: str, hidden: int = 128, layers: int = 4, heads: int = 4, vocab: int = 1024, max_len: int = 1024):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=max_len)
        return LlamaForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_len)
    return GPT2LMHeadModel(cfg).eval()


def paired(fns: dict, base: str, device: torch.device, rounds: int, warmup: int = 3) -> dict:
    """Median seconds of each function and median per-round ratio to ``base`` (rotated order per round), after
    ``warmup`` calls of each (a method's third call at a spec traces its program: the steady state is timed;
    the first call's time is reported apart as ``<name>_first_s``)."""
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync(device)
        first[f"{name}_first_s"] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    out = {**{f"{k}_s": statistics.median(v) for k, v in samples.items()}, **first}
    for k in names:
        if k != base:
            out[f"{k}_x_{base}"] = statistics.median(a / b for a, b in zip(samples[k], samples[base]))
    return out, samples


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def run_model(kind: str, n_new: int, seq: int, n_steps: int, rounds: int, device: torch.device) -> dict:
    module = build(kind).to(device)
    f, p = ax.functionalize(module, output="logits", embedding=EMBEDDING[kind])
    ids = torch.randint(0, module.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        x = f.embed(p, ids)
    start = seq - n_new
    new = ids[:, start:]
    targets = [ax.lm.next_token(new[:, k], start + k - 1) for k in range(n_new)]
    entry: dict = {"n_new": n_new, "seq": seq, "batch": 1}

    # ------------------------------------------------------------------ IG
    def ig_separate():
        return torch.stack([ax.integrated_gradients(f, p, x, t, n_steps=n_steps).sum(-1) for t in targets], 1)

    def ig_generation(strategy="auto"):
        return ax.lm.generation(ax.integrated_gradients, f, p, x, new, start=start, n_steps=n_steps, strategy=strategy)

    alphas = torch.linspace(0.0, 1.0, n_steps + 2, device=device)[1:-1].view(-1, 1, 1)
    points = alphas * x  # the 32 path points from a zero baseline: the batch of one IG forward
    pos = torch.arange(start - 1, start - 1 + n_new, device=device)

    def forward():
        with torch.no_grad():
            return f(p, points)

    def forward_backward():
        xx = points.detach().requires_grad_()
        return torch.autograd.grad(f(p, xx)[:, start - 1, new[0, 0]].sum(), xx)

    def loop():  # the shared-forward design by hand: one forward, n backward passes
        xx = points.detach().requires_grad_()
        out = f(p, xx)
        return [torch.autograd.grad(out[:, pos[k], new[0, k]].sum(), xx, retain_graph=True) for k in range(n_new)]

    a, b, c = ig_generation(), ig_separate(), ig_generation("vmap")
    fns = {"separate": ig_separate, "generation": ig_generation, "vmap": lambda: ig_generation("vmap"),
           "forward": forward, "forward_backward": forward_backward, "loop": loop}
    times, samples = paired(fns, "separate", device, rounds)
    bounds = [(fw + n_new * (fb - fw)) / (n_new * fb) for fw, fb in zip(samples["forward"], samples["forward_backward"])]
    loops = [lp / (n_new * fb) for lp, fb in zip(samples["loop"], samples["forward_backward"])]
    entry["ig"] = {"n_steps": n_steps, **times, "bound": statistics.median(bounds),
                   "loop_x_n_forward_backward": statistics.median(loops),
                   "bw_over_f": statistics.median((fb - fw) / fw for fw, fb in zip(samples["forward"], samples["forward_backward"])),
                   "max_rel_diff": rel(a, b), "max_rel_diff_vmap": rel(c, b)}
    print(f"{kind:6s} ig      {fmt(entry['ig'])}", flush=True)

    # ------------------------------------------------------------------ AttnLRP
    comp = ax.composites.attn_lrp()

    def lrp_separate():
        return torch.stack([ax.lrp(f, p, x, t, composite=comp).sum(-1) for t in targets], 1)

    def lrp_generation(strategy="auto"):
        return ax.lm.generation(ax.lrp, f, p, x, new, start=start, composite=comp, strategy=strategy)

    a, b, c = lrp_generation(), lrp_separate(), lrp_generation("vmap")
    times, _ = paired({"separate": lrp_separate, "generation": lrp_generation,
                       "vmap": lambda: lrp_generation("vmap")}, "separate", device, rounds * 3)
    entry["attn_lrp"] = {**times, "max_rel_diff": rel(a, b), "max_rel_diff_vmap": rel(c, b)}
    print(f"{kind:6s} attnlrp {fmt(entry['attn_lrp'])}", flush=True)
    return entry


def fmt(row: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU default 1; 0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 4 new tokens, 8 steps (smoke test)")
    ap.add_argument("--models", default="llama,gpt2")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads if args.threads is not None else (0 if device.type == "cuda" else 1)
    if threads:
        torch.set_num_threads(threads)
    load = os.getloadavg()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    n_new, n_steps, rounds = (4, 8, 2) if args.quick else (16, 32, args.rounds)
    models = {kind: run_model(kind, n_new, 128, n_steps, rounds, device) for kind in args.models.split(",")}
    targets = {f"{kind}: {m} generation / {n_new} calls": [round(e[m]["generation_x_separate"], 3), 0.5,
                                                          bool(e[m]["generation_x_separate"] <= 0.5)]
               for kind, e in models.items() for m in ("ig", "attn_lrp")}
    if not args.quick:
        write("generation", {"load_average_at_start": load, "rounds": rounds, "targets": targets, "models": models})


if __name__ == "__main__":
    main()
