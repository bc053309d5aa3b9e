"""``attrax demo --text``: train a small transformer on planted evidence tokens and explain it.

The task is synthetic and its answer is known: each sequence is 8-16 random filler words with one
*evidence* word planted at a random position, and the class is the topic of that word (``goal``
and ``match`` are sports, ``guitar`` and ``song`` music, ...). A method explains the model well
when the token it ranks highest is the planted one; the report's headline is that *hit rate*.

Writes to ``--out`` (default ``attrax-demo-text/``):

* ``model.pt``: the trained weights and their held-out accuracy (a second run reuses them);
* ``text.html``: a few held-out samples, one line per method, tokens coloured by relevance;
* ``text.png``: the same as an image (matplotlib);
* ``report.md``: per method, the evidence-token hit rate over the explained samples and the time
  (seconds, and as a ratio to one forward + backward pass).

Relevance per token is the attribution w.r.t. the token embedding summed over the embedding dim
(``ax.functionalize(model, embedding="embed")``, then ``attr.sum(-1)``); padded positions carry a
key padding mask passed as ``additional_forward_args``.

Training replaces 10 % of the tokens by ``<mask>`` and, where that hides the evidence word, asks
for a uniform prediction, so the ``<mask>`` embedding means "no evidence here": it is the baseline
of IG and DeepLift and what the perturbation methods put in place of a token. (Without it the
untrained reference is not neutral: a zero embedding read as one class with a logit of 8, and
zero-baseline IG missed that class's evidence; see ``notes/decisions.md``.)

``--steps 150 --samples 64`` is the fast path the test suite runs (about 10 s).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import attrax as ax

__all__ = ["CLASSES", "EVIDENCE", "FILLER", "TokenClassifier", "hit_rate", "main", "make_data", "methods", "run"]

#: the planted evidence words of each class; the class of a sequence is the class of its evidence word
EVIDENCE: dict[str, tuple[str, ...]] = {
    "sports": ("goal", "match"),
    "music": ("guitar", "song"),
    "food": ("pasta", "bread"),
    "weather": ("rain", "storm"),
}
CLASSES = tuple(EVIDENCE)
#: topic-free words the sequences are made of
FILLER = (
    "the", "a", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "with", "as", "by", "at", "from",
    "this", "be", "or", "an", "are", "but", "not", "have", "one", "all", "they", "we", "there", "so", "some", "what",
    "about", "which", "when", "out", "up", "into", "more", "very", "then", "just", "over", "after", "still",
)
PAD, MASK = "<pad>", "<mask>"
VOCAB = (PAD, MASK, *FILLER, *(w for words in EVIDENCE.values() for w in words))
MASK_ID, FIRST_FILLER = 1, 2
MIN_LEN, MAX_LEN = 8, 16
#: share of tokens replaced by ``<mask>`` in training (a masked evidence word leaves no evidence)
MASK_RATE = 0.1


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` sequences: ``(ids (n, MAX_LEN), keep mask (n, MAX_LEN), labels (n,), evidence position (n,))``.

    Lengths are uniform in ``[MIN_LEN, MAX_LEN]`` (right-padded with ``<pad>``); every position
    holds a random filler word except one, uniformly placed, which holds a random evidence word of
    the sample's class.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (n,), generator=g)
    keep = (torch.arange(MAX_LEN) < lengths[:, None]).long()
    ids = torch.randint(FIRST_FILLER, FIRST_FILLER + len(FILLER), (n, MAX_LEN), generator=g) * keep
    labels = torch.randint(len(CLASSES), (n,), generator=g)
    where = (torch.rand(n, generator=g) * lengths).long()
    per_class = len(EVIDENCE[CLASSES[0]])
    word = FIRST_FILLER + len(FILLER) + labels * per_class + torch.randint(per_class, (n,), generator=g)
    ids[torch.arange(n), where] = word
    return ids, keep, labels, where


class TokenClassifier(nn.Module):
    """Token embedding + learned positions, a 2-layer ``nn.TransformerEncoder``, mean pooling, a linear head."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(0.02 * torch.randn(MAX_LEN, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, len(CLASSES))

    def forward(self, ids: Tensor, keep: Tensor) -> Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=keep == 0)
        return self.head((h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))


def _progress(iterable: Any, desc: str, total: int | None = None, enabled: bool = True) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


def _masked(ids: Tensor, keep: Tensor, y: Tensor, where: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Training inputs with ``MASK_RATE`` of the tokens masked, and soft labels: one-hot, or uniform where the
    evidence word was masked (no evidence left: the model learns that ``<mask>`` means "nothing here")."""
    masked = (torch.rand(ids.shape, generator=g) < MASK_RATE) & (keep == 1)
    soft = nn.functional.one_hot(y, len(CLASSES)).float()
    lost = masked[torch.arange(len(y)), where]
    soft[lost] = 1.0 / len(CLASSES)
    return ids.masked_fill(masked, MASK_ID), soft


def train(out: Path, steps: int, progress: bool) -> tuple[nn.Module, float, bool]:
    """Train (or load the cached) model; returns ``(model, held-out accuracy, loaded_from_cache)``."""
    ids_te, keep_te, y_te, _ = make_data(512, seed=1)
    cache = out / "model.pt"
    if cache.exists():
        state = torch.load(cache, weights_only=True)
        if state.get("steps") == steps and state.get("vocab") == list(VOCAB):
            model = TokenClassifier()
            model.load_state_dict(state["model"])
            return model.eval(), float(state["accuracy"]), True
    torch.manual_seed(0)
    model = TokenClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids, keep, y, where = make_data(max(steps, 1) * 64, seed=0)  # fresh samples every step
    ids, soft = _masked(ids, keep, y, where, torch.Generator().manual_seed(0))
    model.train()
    for s in _progress(range(steps), "training", steps, progress):
        batch = slice(s * 64, (s + 1) * 64)
        loss = nn.functional.cross_entropy(model(ids[batch], keep[batch]), soft[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(ids_te, keep_te).argmax(1) == y_te).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "accuracy": accuracy, "steps": steps, "vocab": list(VOCAB)}, tmp)
    os.replace(tmp, cache)
    return model, accuracy, False


def methods(baseline: Tensor) -> dict[str, Callable[..., Tensor]]:
    """Every method that applies to token embeddings, as ``fn(model_fn, params, x, target, keep)``.

    ``baseline`` is the reference embedding (the ``<mask>`` token's, ``(1, 1, D)``): the start of the
    integration path, DeepLift's reference, and what perturbation methods put in place of a token
    (they remove whole tokens). AttnLRP and CP-LRP appear when ``ax.composites`` has them.
    """
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    def tokens(x: Tensor) -> Tensor:
        return torch.arange(x.shape[1]).view(1, -1, 1)

    def ref(x: Tensor) -> Tensor:
        return baseline.expand(x.shape)

    table: dict[str, Callable[..., Tensor]] = {
        "gradient": lambda f, p, x, t, k: ax.gradient(f, p, x, t, additional_forward_args=(k,)),
        "saliency": lambda f, p, x, t, k: ax.saliency(f, p, x, t, additional_forward_args=(k,)),
        "input_x_gradient": lambda f, p, x, t, k: ax.input_x_gradient(f, p, x, t, additional_forward_args=(k,)),
        "integrated_gradients": lambda f, p, x, t, k: ax.integrated_gradients(
            f, p, x, t, baseline=ref(x), n_steps=32, chunk_size=8, additional_forward_args=(k,)),
        "deeplift": lambda f, p, x, t, k: ax.deeplift(f, p, x, t, baseline=ref(x), additional_forward_args=(k,)),
        "lrp_epsilon": lambda f, p, x, t, k: ax.lrp(f, p, x, t, additional_forward_args=(k,)),
    }
    for name in ("attn_lrp", "cp_lrp"):
        if hasattr(ax.composites, name):
            composite = getattr(ax.composites, name)
            table[f"lrp_{name}"] = lambda f, p, x, t, k, c=composite: ax.lrp(
                f, p, x, t, composite=c(), additional_forward_args=(k,))
    table.update({
        "occlusion": lambda f, p, x, t, k: ax.occlusion(
            f, p, x, t, window=(1, x.shape[2]), stride=(1, x.shape[2]), baseline=ref(x), additional_forward_args=(k,)),
        "feature_ablation": lambda f, p, x, t, k: ax.feature_ablation(
            f, p, x, t, feature_mask=tokens(x), baseline=ref(x), additional_forward_args=(k,)),
        "shapley_sampling": lambda f, p, x, t, k: ax.shapley_sampling(
            f, p, x, t, feature_mask=tokens(x), baseline=ref(x), n_samples=8, generator=gen(),
            additional_forward_args=(k,)),
    })
    return table


def hit_rate(relevance: Tensor, keep: Tensor, where: Tensor) -> float:
    """Share of samples whose highest-relevance real (unpadded) token is the planted evidence token."""
    top = relevance.masked_fill(keep == 0, -math.inf).argmax(1)
    return float((top == where).float().mean())


def _time(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _tokens(ids: Tensor, keep: Tensor) -> list[list[str]]:
    return [[VOCAB[int(i)] for i in row[: int(k.sum())]] for row, k in zip(ids, keep)]


def run(out: str | os.PathLike[str] = "attrax-demo-text", *, samples: int = 256, steps: int = 1000, show: int = 4,
        progress: bool = True) -> dict[str, Any]:
    """Run the text demo; returns the report as a dict (also written to ``out``).

    Args:
        out: Output folder.
        samples: Held-out samples explained (the hit rates are over these).
        steps: Training steps of 64 fresh sequences each (the model is cached per ``steps``).
        show: Samples drawn in ``text.html`` / ``text.png``, one line per method each.
        progress: Progress bars (tqdm, when installed).
    """
    if samples < 1 or show < 1 or steps < 0:
        raise ValueError(f"samples and show must be >= 1 and steps >= 0; got samples={samples}, show={show}, steps={steps}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # a tiny model: a second thread buys little and, on busy cores, costs much (2-core VM under load:
    # 0.024 s per training step on one thread, 0.86 s on two); restored afterwards
    torch.set_num_threads(1)
    try:
        return _run(out, samples, steps, show, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, samples: int, steps: int, show: int, progress: bool) -> dict[str, Any]:
    model, accuracy, cached = train(out, steps, progress)
    ids, keep, y, where = make_data(samples, seed=2)  # held out: training used seed 0, the accuracy seed 1
    model_fn, params = ax.functionalize(model, embedding="embed")
    x = model_fn.embed(params, ids).detach()
    baseline = model_fn.embed(params, torch.tensor([[MASK_ID]])).detach()  # (1, 1, D): "no token here"

    def fwd_bwd() -> Tensor:
        xx = x.detach().requires_grad_()
        return torch.autograd.grad(model_fn(params, xx, keep).gather(1, y[:, None]).sum(), xx)[0]

    base = _time(fwd_bwd)
    rows, relevance = [], {}
    for name, fn in _progress(methods(baseline).items(), "methods", enabled=progress):
        rel = fn(model_fn, params, x, y, keep).detach().sum(-1)  # the first call also traces (rule methods)
        seconds = _time(lambda fn=fn: fn(model_fn, params, x, y, keep), repeats=1)
        rows.append({"method": name, "hit_rate": hit_rate(rel, keep, where), "seconds": seconds,
                     "time_ratio": seconds / base})
        relevance[name] = rel
    _write_heatmaps(out, ids[:show], keep[:show], y[:show], where[:show], {k: v[:show] for k, v in relevance.items()})
    report = {"accuracy": accuracy, "cached_model": cached, "samples": samples, "steps": steps, "methods": rows}
    _write_report(out / "report.md", report)
    return report


def _write_heatmaps(out: Path, ids: Tensor, keep: Tensor, y: Tensor, where: Tensor, relevance: dict[str, Tensor]) -> None:
    """``text.html`` and ``text.png``: per sample, the planted token, then one line per method."""
    tokens, values, labels = [], [], []
    for i, row in enumerate(_tokens(ids, keep)):
        planted = torch.zeros(len(row))
        planted[int(where[i])] = 1.0
        tokens.append(row)
        values.append(planted)
        labels.append(f"#{i} {CLASSES[int(y[i])]}: planted")
        for name, rel in relevance.items():
            tokens.append(row)
            values.append(rel[i, : len(row)])
            labels.append(f"#{i} {name}")
    matrix = torch.zeros(len(values), MAX_LEN)
    for i, v in enumerate(values):
        matrix[i, : len(v)] = v
    title = "attrax text demo: relevance per token (red: for the true class, blue: against)"
    ax.viz.text_html(tokens, matrix, out / "text.html", labels=labels, title=title)
    ax.viz.text_png(tokens, matrix, out / "text.png", labels=labels, dpi=120)


def _write_report(path: Path, report: dict[str, Any]) -> None:
    lines = [
        "# attrax text demo report",
        "",
        f"Model: a 2-layer `nn.TransformerEncoder` (d = 32) trained for {report['steps']} steps on planted "
        f"evidence tokens. Held-out accuracy: {report['accuracy'] * 100:.1f} %"
        + (" (cached model)" if report["cached_model"] else ""),
        "",
        f"{report['samples']} held-out sequences of {MIN_LEN}-{MAX_LEN} filler words with one planted evidence "
        "word; target = the true class; relevance per token = attributions w.r.t. the token embedding summed "
        "over the embedding dim. Baseline (IG, DeepLift) and removed token (occlusion, ablation, Shapley): the "
        "`<mask>` embedding, which training taught to mean \"no evidence\".",
        "",
        "| method | evidence-token hit rate | time (s) | time (x fwd+bwd) |",
        "|---|---:|---:|---:|",
    ]
    for r in report["methods"]:
        lines.append(f"| {r['method']} | {r['hit_rate']:.3f} | {r['seconds']:.3f} | {r['time_ratio']:.1f} |")
    lines += [
        "",
        "*hit rate*: share of samples whose highest-relevance token (signed; |.| for saliency) is the planted",
        f"evidence word (chance: 1 in {MIN_LEN}-{MAX_LEN}).",
        "*time*: one warm call on all samples (the first call, which also traces the rule methods, is not",
        "counted), on one CPU thread.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="attrax demo --text", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="attrax-demo-text", help="output folder (default: attrax-demo-text)")
    ap.add_argument("--samples", type=int, default=256, help="held-out samples to explain (default: 256)")
    ap.add_argument("--steps", type=int, default=1000, help="training steps of 64 sequences (default: 1000)")
    ap.add_argument("--show", type=int, default=4, help="samples drawn in text.html / text.png (default: 4)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.samples < 1 or args.show < 1 or args.steps < 0:
        ap.error("--samples and --show must be >= 1 and --steps >= 0")
    report = run(args.out, samples=args.samples, steps=args.steps, show=args.show, progress=not args.no_progress)
    print(f"held-out accuracy: {report['accuracy'] * 100:.1f} %")
    for r in report["methods"]:
        print(f"{r['method']:>22}: hit rate {r['hit_rate']:.3f}  ({r['seconds']:.2f} s)")
    out = Path(args.out)
    print(f"wrote {out / 'text.html'}, {out / 'text.png'} and {out / 'report.md'}")
    return 0
