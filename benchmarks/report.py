"""Render benchmarks/results/*.json as the README's tables (between <!-- bench:start/end --> markers).

    python benchmarks/report.py          # rewrite the README section in place
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _machine(d: dict) -> str:
    m = d["machine"]
    where = m.get("gpu") or f"{m.get('processor', 'CPU')}, {m.get('cpu_threads')} threads"
    return f"{m['date']}, torch {m['torch']}, {where}"


def gradients() -> list[str]:
    d = _load("gradients-cpu")
    if not d:
        return []
    lines = [f"**Gradient family** vs Captum {d['machine'].get('captum', '')} ({_machine(d)}); ratio to one forward + input-gradient pass, each timed interleaved with that pass alone:", "",
             "| model | method | attrax | Captum | attrax / Captum | peak MB attrax / Captum |", "|---|---|---:|---:|---:|---:|"]
    for model, r in d["models"].items():
        for name, v in r["methods"].items():
            lines.append(f"| {model} {tuple(r['input_shape'])} | {name} | {v['attrax_x_fwd_bwd']:.2f}× | {v['captum_x_fwd_bwd']:.2f}× "
                         f"| {v['attrax_over_captum']:.2f} | {v['peak_mb_attrax']:.0f} / {v['peak_mb_captum']:.0f} |")
    return lines + [""]


def rules() -> list[str]:
    d = _load("rules-cpu")
    if not d:
        return []
    lines = [f"**Rule methods** vs Captum ({_machine(d)}); ratio to one forward + input-gradient pass, each timed "
             "interleaved with that pass alone; completeness gap = max |Σattr − Δf| / max(1, |Δf|):", "",
             "| model | method | attrax | Captum | completeness attrax / Captum | peak MB attrax / Captum |", "|---|---|---:|---:|---:|---:|"]
    for model, r in d["models"].items():
        for name, v in r["methods"].items():
            cap = f"{v['captum_x_fwd_bwd']:.2f}×" if "captum_x_fwd_bwd" in v else "fails: " + v.get("captum_error", "")[:48]
            comp = ""
            if "completeness_attrax" in v:
                comp = f"{v['completeness_attrax']:.1e} / " + (f"{v['completeness_captum']:.1e}" if "completeness_captum" in v else "—")
            mem = f"{v['peak_mb_attrax']:.0f} / " + (f"{v['peak_mb_captum']:.0f}" if "peak_mb_captum" in v else "—")
            label = f"{name} (chunk {v['chunk_size']})" if "chunk_size" in v else name
            lines.append(f"| {model} {tuple(r['input_shape'])} | {label} | {v['attrax_x_fwd_bwd']:.2f}× | {cap} | {comp} | {mem} |")
    sweeps = [(model, v["chunk_sweep"]) for model, r in d["models"].items() for v in r["methods"].values() if "chunk_sweep" in v]
    if sweeps:
        lines += ["", "DeepLiftShap `chunk_size` (baselines per vectorised chunk) bounds memory; time ratio / peak MB:", ""]
        for model, sw in sweeps:
            cells = ", ".join(f"{c}: {e['x_fwd_bwd']:.1f}× / {e['peak_mb']:.0f} MB" for c, e in sw.items())
            lines.append(f"* {model}: {cells}")
    return lines + [""]


def lrp() -> list[str]:
    d = _load("lrp-cpu")
    if not d:
        return []
    lines = [f"**LRP** (epsilon_plus_flat, BatchNorm merged) vs Zennit {d['machine'].get('zennit', '')} with hooks registered "
             f"beforehand ({_machine(d)}):", "",
             "| model | attrax | Zennit | attrax / Zennit | max rel. diff to Zennit × score | peak MB attrax / Zennit |",
             "|---|---:|---:|---:|---:|---:|"]
    for model, r in d["models"].items():
        v = r["lrp"]
        z = f"{v['zennit_x_fwd_bwd']:.2f}×" if "zennit_x_fwd_bwd" in v else "—"
        ratio = f"{v['attrax_over_zennit']:.2f}" if "attrax_over_zennit" in v else "—"
        lines.append(f"| {model} {tuple(r['input_shape'])} | {v['attrax_x_fwd_bwd']:.2f}× | {z} | {ratio} | "
                     f"{v.get('max_rel_diff_to_zennit', float('nan')):.1e} | {v['peak_mb_attrax']:.0f} / {v.get('peak_mb_zennit', 0):.0f} |")
    return lines + [""]


def conditional() -> list[str]:
    d = _load("conditional-cpu")
    if not d:
        return []
    r = d["result"]
    s = r["seconds"]
    crp = f", zennit-crp {s['zennit_crp']:.2f} s ({r['batched_over_zennit_crp']:.2f}×, max rel. diff {r['max_rel_diff_to_zennit_crp']:.0e})" if "zennit_crp" in s else ""
    return [f"**Conditional attribution** ({_machine(d)}): {r['conditions']} conditions on {d['model']}: one call "
            f"{s['attrax_batched']:.2f} s vs {r['conditions']} LRP calls {s['attrax_64_lrp']:.2f} s "
            f"(**{r['batched_over_independent']:.3f}×**){crp}.", ""]


def perturbation() -> list[str]:
    d = _load("perturbation-cpu")
    if not d:
        return []
    lines = [f"**Perturbation methods** vs Captum, same number of model evaluations ({_machine(d)}); speedup = Captum time / attrax time, each timed interleaved with one forward + input-gradient pass alone:", "",
             "| model | comparison | speedup |", "|---|---|---:|"]
    for model, r in d["models"].items():
        for k, v in r["speedups"].items():
            lines.append(f"| {model} | {k.replace('_speedup_vs_', ' vs ')} | {v:.2f}× |")
    return lines + [""]


def serving() -> list[str]:
    d = _load("serving-cpu")
    if not d:
        return []
    lines = [f"**Serving** ({_machine(d)}): per-call latency over a stream of {next(iter(d['models'].values()))['calls']} "
             "batches with new targets each call, after 3 warm-up calls:", "",
             "| model | method | variant | median ms | × eager attrax | × fwd+bwd | first call s | recompiles after warm-up |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for model, r in d["models"].items():
        for method, v in r["methods"].items():
            for label, row in v["variants"].items():
                rec = str(v["recompiles_after_warmup"]) if label == "attrax compiled" else ""
                lines.append(f"| {model} {tuple(r['input_shape'])} | {method} | {label} | {row['median_ms']:.1f} | "
                             f"{row['over_eager']:.2f}× | {row['x_fwd_bwd']:.1f}× | {row['first_call_s']:.1f} | {rec} |")
    return lines + [""]


def dataset() -> list[str]:
    d = _load("dataset-cpu")
    if not d:
        return []
    lines: list[str] = []
    a = d.get("adaptive_ig")
    if a:
        lines += [f"**IG accuracy/cost dial** ({_machine(d)}): `n_steps=\"auto\"`, rtol {a['rtol']}, max_steps {a['max_steps']}, "
                  "against the smallest fixed Gauss-Legendre n meeting rtol on the same samples (per model, averaged):", "",
                  "| models | strategy | reach rtol | mean evaluations (+ forwards) | evaluations / fixed n | time / fixed n |",
                  "|---|---|---:|---:|---:|---:|"]
        for fam, rows in a["families"].items():
            for strategy, v in rows.items():
                lines.append(f"| {fam} | {strategy} | {100 * v['converged_fraction']:.1f} % | {v['mean_evaluations']:.0f} "
                             f"(+{v['mean_forwards']:.0f}) | {v['evaluations_over_fixed']:.2f} | {v['time_over_fixed']:.2f} |")
        lines.append("")
    tp = d.get("throughput")
    if tp:
        lines += [f"**attribute_dataset throughput** ({_machine(d)}), {tp['method']} on {tp['model']}, {tp['samples']} samples, "
                  f"batch {tp['batch_size']}, samples/s (median of runs):", "",
                  "| configuration | samples/s |", "|---|---:|"]
        for name, v in tp["configs"].items():
            lines.append(f"| {name} | {v['samples_per_s']:.0f} |")
        sp = tp["speedups"]
        lines += ["", f"2 processes: **{sp['2proc_vs_1proc_default_threads']:.2f}×** one process with default threads, "
                  f"{sp['2proc_vs_1proc_1thread']:.2f}× one single-threaded process.", ""]
    return lines


def zoo() -> list[str]:
    d = _load("zoo-cpu")
    if not d:
        return []
    m = d["machine"]
    methods = ["gradient", "integrated_gradients", "deeplift", "deeplift_shap", "lrp_epsilon_plus_flat", "grad_cam"]
    lines = [f"Model zoo ({m['date']}, {m['device']}, torch {m['torch']}, torchvision {m['torchvision']}, timm {m['timm']}, "
             f"transformers {m['transformers']}, random weights, input {m['input']}; `gap` = relative completeness gap, "
             "`clear error` = the op the method has no rule for, raised before any computation):", "",
             "| model | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for model, r in d["results"].items():
        cells = [re.sub(r" \([0-9.]+s\)", "", r.get(k, "")) for k in methods]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines + [""]


def render() -> str:
    parts = gradients() + rules() + lrp() + conditional() + perturbation() + serving() + dataset()
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for tag, body in (("bench", render()), ("zoo", "\n".join(zoo()).rstrip() + "\n")):
        start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
        if start in text and end in text:
            text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: f"{start}\n{body}{end}", text, flags=re.S)
    readme.write_text(text)
    print("README tables updated")


if __name__ == "__main__":
    main()
