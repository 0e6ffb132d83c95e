"""Writing evaluation results: JSON (full, and the Hub's eval_results.json), markdown tables, charts.

eval_results.json is written with model_card.write_eval_results, the format `bloodgen-hf push` turns
into the card's model-index: {"split", "num_generated", "metrics": [{"type": "fid", "value": <mean>,
"name", "config": <extractor>, "std", "runs": [...], "floor": <real-vs-real mean>}, ...], "protocol"}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bloodgen_hf.io import atomic_path, save_image
from bloodgen_hf.plots import panels, save_figure

LOWER_IS_BETTER = ("fid", "fd_", "kid", "class_fid", "class_fd", "memorization")
DESCRIPTIVE = ("nearest_real",)  # too small means copying, too large means unlike the data
HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
img {{ max-width: 100%; }}
</style></head>
<body>
{body}
</body></html>
"""


def write_markdown_report(lines: list[str], out: Path, html: bool = False) -> Path:
    """out/report.md, and with `html` a report.html beside it (same relative links to the charts)."""
    text = "\n".join(lines) + "\n"
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    if html:
        import markdown

        title = lines[0].lstrip("# ") if lines else "report"
        with atomic_path(out / "report.html") as tmp:
            tmp.write_text(HTML_PAGE.format(title=title, body=markdown.markdown(text, extensions=["tables"])))
    return out / "report.md"


def write_json(data: dict, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return path


TITLES = {
    "fid": "FID (Inception-v3, clean-fid)",
    "kid": "KID",
    "is": "Inception Score",
    "fd": "Fréchet distance",
    "one_nn_accuracy": "1-NN two-sample accuracy",
    "class_accuracy": "BloodNet accuracy on conditional samples",
    "memorization": "near-copies of real images (share)",
}


def metric_title(key: str, protocol: dict) -> str:
    """'fd_bloodnet' -> 'Fréchet distance (bloodnet features), 5 x 10000'."""
    extractor = protocol["extractor"]["name"]
    base = key[: -len(extractor) - 1] if key.endswith("_" + extractor) else key
    title = TITLES.get(base, base.replace("_", " "))
    if base != key:
        title += f" ({extractor} features)"
    return f"{title}, {protocol['runs']} x {protocol['n']}"


def hub_metrics(results: dict) -> list[dict]:
    """One model-index entry per finite metric: value = mean over runs, with std, runs and floor kept."""
    protocol, floor = results["protocol"], results.get("floor", {})
    entries = []
    for key, summary in results["metrics"].items():
        if not np.isfinite(summary["mean"]):
            continue
        entry = {"type": key, "value": summary["mean"], "name": metric_title(key, protocol)}
        entry.update(config=protocol["extractor"]["name"], std=summary["std"], runs=summary["runs"])
        if key in floor:
            entry["floor"] = floor[key]["mean"]
        entries.append(entry)
    return entries


def write_hub_results(results: dict, folder: Path) -> Path:
    from bloodgen_hf.model_card import write_eval_results

    protocol = results["protocol"]
    return write_eval_results(folder, hub_metrics(results), protocol["split"], protocol["n"], protocol=protocol)


def mean_std(summary: dict | None, digits: int = 4) -> str:
    if not summary:
        return "–"
    if len(summary.get("runs", [])) <= 1:
        return f"{summary['mean']:.{digits}g}"
    return f"{summary['mean']:.{digits}g} ± {summary['std']:.2g}"


def direction(metric: str) -> str:
    """Which way is better: ↓, ↑, → 0.5 (1-NN), or '' for descriptive values."""
    if metric.startswith("one_nn"):
        return "→ 0.5"
    if metric.startswith(DESCRIPTIVE):
        return ""
    return "↓" if metric.startswith(LOWER_IS_BETTER) else "↑"


def metric_table(results: dict) -> list[str]:
    """| metric | model (mean ± std over runs) | real vs real |"""
    floor = results.get("floor", {})
    lines = ["| metric | | model | real vs real |", "|---|---|---|---|"]
    for name, summary in results["metrics"].items():
        lines.append(f"| {name} | {direction(name)} | {mean_std(summary)} | {mean_std(floor.get(name))} |")
    return lines


def per_class_table(results: dict) -> list[str]:
    per_class = results.get("per_class", {})
    if not per_class:
        return []
    classes = list(dict.fromkeys(c for values in per_class.values() for c in values))
    lines = ["| class | " + " | ".join(per_class) + " |", "|---" * (len(per_class) + 1) + "|"]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(mean_std(per_class[m].get(c), 3) for m in per_class) + " |")
    return lines


def protocol_line(protocol: dict) -> str:
    extractor = protocol["extractor"]
    floor = f"; real-vs-real floor at n={protocol['floor_n']}" if protocol.get("floor_n") else ""
    upsample = protocol.get("upsample")
    made = f", made at {upsample['from']}px and upsampled ({upsample['method']})" if upsample else ""
    return (
        f"{protocol['runs']} runs (seeds {protocol['seeds'][0]}..{protocol['seeds'][-1]}), n={protocol['n']} real "
        f"images from {protocol['dataset']} {protocol['split']} at {protocol['size']}px vs n generated{made} "
        f"({protocol['distribution']} class distribution), features: {extractor['name']} "
        f"({extractor['identity'][:40]}…){floor}"
    )


def write_evaluation(evaluation, out: Path, model: str) -> Path:
    """<out>/results.json, eval_results.json, summary.md and memorization_pairs.png (if measured)."""
    results = {"model": model, **evaluation.results}
    with atomic_path(out, is_dir=True) as tmp:
        write_json(results, tmp / "results.json")
        write_hub_results(results, tmp)
        lines = [f"# Evaluation of `{model}`", "", protocol_line(results["protocol"]), "", *metric_table(results)]
        if results.get("per_class"):
            lines += ["", "## Per class", "", *per_class_table(results)]
        if evaluation.memorization_pairs is not None:
            save_image(evaluation.memorization_pairs, tmp / "memorization_pairs.png")
            threshold = results["protocol"]["memorization_threshold"]
            lines += [
                "",
                "## Closest generated/real pairs",
                "",
                f"Top: the generated images nearest to a real image; bottom: that real image. Near-copy "
                f"threshold: RMS pixel difference ≤ {threshold:.4f} (the "
                f"{results['protocol']['memorization_quantile']:.0%} quantile of real images' distances to "
                "their nearest other real image).",
                "",
                "![closest pairs](memorization_pairs.png)",
            ]
        (tmp / "summary.md").write_text("\n".join(lines) + "\n")
    return out


def bar_chart(entries: dict[str, dict], path: Path) -> Path:
    """One panel per metric, one bar per model with its std as error bar and the real floor dashed."""
    metrics = list(dict.fromkeys(m for results in entries.values() for m in results["metrics"]))
    fig, axes = panels(len(metrics), min(4, len(metrics)), 3.2, 2.6)
    names = list(entries)
    for ax, metric in zip(axes, metrics):
        means = [entries[n]["metrics"].get(metric, {}).get("mean", np.nan) for n in names]
        stds = [entries[n]["metrics"].get(metric, {}).get("std", 0.0) for n in names]
        ax.bar(names, means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(names))])
        floors = [entries[n].get("floor", {}).get(metric, {}).get("mean") for n in names]
        if floors and floors[0] is not None:
            ax.axhline(floors[0], color="k", linestyle="--", linewidth=1, label="real vs real")
        ax.set_title(f"{metric} {direction(metric)}", fontsize=9)
        ax.tick_params(labelsize=8)
    return save_figure(fig, path)


def curves_chart(curves: dict[str, list[dict]], path: Path) -> Path | None:
    """Training curves (every numeric key of metrics.jsonl against step), one panel per model."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, axes = panels(len(curves), len(curves), 4.5, 3.2)
    for ax, (name, rows) in zip(axes, curves.items()):
        keys = [k for k in rows[-1] if k not in ("step", "epoch", "images_per_s", "lr")]
        steps = [r["step"] for r in rows]
        for key in keys:
            ax.plot(steps, [r.get(key, np.nan) for r in rows], label=key, linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def comparison_table(entries: dict[str, dict]) -> list[str]:
    """Metrics as rows, models as columns, real-vs-real floor last."""
    names = list(entries)
    metrics = list(dict.fromkeys(m for results in entries.values() for m in results["metrics"]))
    lines = ["| metric | | " + " | ".join(names) + " | real vs real |", "|---" * (len(names) + 3) + "|"]
    for metric in metrics:
        values = [mean_std(entries[n]["metrics"].get(metric)) for n in names]
        floor = next((e["floor"][metric] for e in entries.values() if metric in e.get("floor", {})), None)
        lines.append(f"| {metric} | {direction(metric)} | " + " | ".join(values) + f" | {mean_std(floor)} |")
    return lines
