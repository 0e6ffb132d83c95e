"""Quality against training CPU minutes, one line per model family (issue 33).

    python benchmarks/quality_vs_cpu.py --runs gan=runs/gan-v2 ddpm=runs/ddpm-v2 vae=runs/vae-v2 \
        --cpu-minutes 15,30,60,120,240 --n 2000 --data-dir ../shared/data --out reports/quality-vs-cpu \
        [--point ddpm-fast=ddpm-fast]

Each `--runs` item is FAMILY[:LABEL]=RUN_FOLDER (families: gan, ddpm, vae), a run trained with
`--checkpoint-cpu-minutes 15,30,60,120,240` so that it leaves a checkpoint at each mark, which
`--keep-checkpoints` does not prune. CPU minutes are the process CPU time the training loop recorded in each
checkpoint's progress.json (`cpu_seconds`, as `--cpu-budget-minutes` counts it).

For each run and mark the scored checkpoint is the one written at that mark (at the first step past it, so its
CPU time is above the mark by less than one step), else the latest whose CPU time is not above the mark. A
mark the run never reached, or one it passed with no checkpoint at or below it, is reported in the table and
not scored. The checkpoint becomes the pipeline the run would have saved there (EMA weights, its sampler
defaults: bloodgen_hf.training.export), and `--n` of its samples are scored as `bloodgen-hf evaluate
--runs 1 --extractor bloodnet --metrics fd,pr,memorization,accuracy --no-floor` scores them. `--point
LABEL=MODEL[@MINUTES]` adds a saved model as one point at its total cost (the distilled default: teacher,
pairs and student), as stated or as its training_cost.json records it (bloodgen_hf/training/cost.py).

Writes results.json, report.md and quality_vs_cpu.png (FD and class accuracy against the checkpoints' CPU
minutes, log scale) to `--out`; finished points are kept under points/, so a rerun continues.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bloodgen_hf.errors import UsageError
from bloodgen_hf.process import tune_malloc
from bloodgen_hf.registry import ModelLoadError, resolve_model
from bloodgen_hf.training.core import cpu_minute_marks
from bloodgen_hf.training.cost import describe_cost, read_training_cost
from bloodgen_hf.training.export import EXPORTABLE, export_checkpoint

METRICS = ("fd", "pr", "memorization", "accuracy")


@dataclass(frozen=True)
class RunSpec:
    family: str
    label: str
    folder: Path


def parse_run(item: str) -> RunSpec:
    """FAMILY[:LABEL]=FOLDER, e.g. gan=runs/gan-v2 or gan:gan-v1=runs/gan-28."""
    key, sep, folder = item.partition("=")
    family, _, label = key.partition(":")
    if not sep or not folder or family not in EXPORTABLE:
        raise argparse.ArgumentTypeError(
            f"--runs takes FAMILY[:LABEL]=RUN_FOLDER with FAMILY one of {', '.join(EXPORTABLE)}, got {item!r}"
        )
    return RunSpec(family, label or family, Path(folder))


def parse_point(item: str) -> tuple[str, str, float | None]:
    """LABEL=MODEL[@MINUTES]: a saved model (bundled name or folder) drawn as one point at MINUTES, or without
    them at the whole cost its training_cost.json records."""
    label, sep, rest = item.partition("=")
    model, at, minutes = rest.rpartition("@") if "@" in rest else (rest, "", "")
    try:
        value = float(minutes) if at else None
    except ValueError:
        value = math.nan
    if not (sep and label and model and (value is None or value > 0)):
        raise argparse.ArgumentTypeError(f"--point takes LABEL=MODEL or LABEL=MODEL@CPU_MINUTES, got {item!r}")
    return label, model, value


def point_cost(model: str, minutes: float | None) -> tuple[float, str]:
    """A point's CPU minutes and machines: as stated, else the whole cost its training_cost.json records
    (refused where it records none)."""
    if minutes is not None:
        return minutes, "as stated with --point"
    cost = read_training_cost(Path(resolve_model(model)))
    if cost is None or cost.get("cpu_minutes") is None:
        why = "no training_cost.json" if cost is None else "only its own run's minutes, not its origins'"
        raise UsageError(f"--point {model}: its folder records {why}; give its total as LABEL={model}@CPU_MINUTES")
    return float(cost["cpu_minutes"]), describe_cost(cost)[1]


# --- which checkpoint stands for a mark ----------------------------------------------------------------------


def checkpoints(run: Path) -> list[dict]:
    """The run's checkpoints in step order: folder, step, CPU seconds and the marks each was written at."""
    found = []
    for folder in sorted((run / "checkpoints").glob("checkpoint-???????")):
        progress_file = folder / "progress.json"
        if not progress_file.is_file():
            continue
        progress = json.loads(progress_file.read_text())
        found.append(
            {
                "folder": folder,
                "step": progress["step"],
                "cpu_seconds": float(progress.get("cpu_seconds", 0.0)),
                "cpu_marks": [float(m) for m in progress.get("cpu_marks", [])],
                "machines": list(progress.get("machines", [])),
            }
        )
    return found


def cpu_minutes_reached(run: Path, found: list[dict]) -> float:
    """How far the run got: its last logged CPU minutes or its last checkpoint's, whichever is later."""
    reached = max((c["cpu_seconds"] / 60 for c in found), default=0.0)
    log = run / "metrics.jsonl"
    if log.is_file():
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        reached = max([reached, *(r["cpu_minutes"] for r in lines if "cpu_minutes" in r)])
    return reached


def choose_checkpoint(run: Path, mark: float) -> dict:
    """The checkpoint that stands for `mark` CPU minutes, or why there is none ("status" says which).

    status "at mark": written by --checkpoint-cpu-minutes at this mark; "before mark": the latest at or below
    it; "not reached": the run stopped before the mark; "no checkpoint": passed with none at or below it."""
    found = checkpoints(run)
    marked = [c for c in found if any(math.isclose(m, mark) for m in c["cpu_marks"])]
    below = [c for c in found if c["cpu_seconds"] <= mark * 60]
    reached = cpu_minutes_reached(run, found)
    if marked:
        chosen, status = marked[0], "at mark"
    elif reached < mark:
        note = f"not reached: the run stopped at {reached:.1f} CPU-minutes"
        return {"mark": mark, "status": "not reached", "note": note}
    elif below:
        chosen, status = below[-1], "before mark"
    else:
        first = f"; its first is at {found[0]['cpu_seconds'] / 60:.1f}" if found else ""
        note = f"no checkpoint at or below {mark:g} CPU-minutes{first} (train with --checkpoint-cpu-minutes)"
        return {"mark": mark, "status": "no checkpoint", "note": note}
    return {
        "mark": mark,
        "status": status,
        "checkpoint": str(chosen["folder"]),
        "step": chosen["step"],
        "cpu_minutes": chosen["cpu_seconds"] / 60,
        "machine": " then ".join(chosen["machines"]) or "not recorded",  # where the CPU minutes were spent
    }


# --- scoring ---------------------------------------------------------------------------------------------------


class Scorer:
    """The project's evaluation of one pipeline folder (one run of n samples, BloodNet features); the bundled
    BloodNet of each model's size is loaded once for all its points."""

    def __init__(self, n: int, data_dir: str | None):
        self.n, self.data_dir, self.tools = n, data_dir, {}

    def __call__(self, model: str, label: str, out: Path) -> dict:
        from bloodgen_hf.evaluation.protocol import Protocol
        from bloodgen_hf.evaluation.runner import build_tools, evaluate_to_folder
        from bloodgen_hf.registry import load_pipeline

        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        size = pipe.resolution
        if size not in self.tools:
            self.tools[size] = build_tools("bloodnet", METRICS, resolution=size)
        protocol = Protocol(runs=1, n=self.n, metrics=METRICS, with_floor=False)
        result = evaluate_to_folder(pipe, label, out, *self.tools[size], protocol, self.data_dir)
        return summary(result)


def summary(result: dict) -> dict:
    """The numbers the table and plot show, from an evaluation's results."""
    metrics = result["metrics"]
    return {
        "fd_bloodnet": metrics["fd_bloodnet"]["mean"],
        "class_accuracy": metrics["class_accuracy"]["mean"],
        "recall": metrics["recall_bloodnet"]["mean"],
        "precision": metrics["precision_bloodnet"]["mean"],
        "near_copies": metrics["memorization"]["mean"],
        "per_class_accuracy": {k: v["mean"] for k, v in result["per_class"]["class_accuracy"].items()},
    }


Score = Callable[[str, str, Path], dict]  # (bundled model name or pipeline folder, label, eval folder) -> summary


def score_mark(spec: RunSpec, choice: dict, args, out: Path, score: Score) -> dict:
    """One (run, mark) point: kept from an earlier call for the same checkpoint and n, else exported and scored."""
    folder = out / "points" / spec.label / f"{choice['mark']:g}min"
    point_file = folder / "point.json"
    if point_file.is_file():
        kept = json.loads(point_file.read_text())
        if kept.get("checkpoint") == choice["checkpoint"] and kept.get("n") == args.n:
            return kept
    pipeline = export_checkpoint(
        spec.family, spec.folder, Path(choice["checkpoint"]), folder / "pipeline", args.data_dir
    )
    scores = score(str(pipeline), f"{spec.label}@{choice['mark']:g}min", folder / "eval")
    point = {"family": spec.family, "label": spec.label, "run": str(spec.folder), **choice, "n": args.n, **scores}
    point_file.write_text(json.dumps(point, indent=2))
    return point


def score_fixed_point(label: str, model: str, cost: tuple[float, str], args, out: Path, score: Score) -> dict:
    """A saved model (e.g. the distilled default) as one point at its total CPU cost (minutes, machines)."""
    minutes, machine = cost
    folder = out / "points" / label
    point_file = folder / "point.json"
    if point_file.is_file():
        kept = json.loads(point_file.read_text())
        if kept.get("model") == model and kept.get("n") == args.n and kept.get("cpu_minutes") == minutes:
            return kept
    scores = score(model, label, folder / "eval")
    point = {"family": label, "label": label, "model": model, "status": "fixed", "mark": minutes, "n": args.n}
    point.update({"cpu_minutes": minutes, **scores, "machine": machine})
    folder.mkdir(parents=True, exist_ok=True)
    point_file.write_text(json.dumps(point, indent=2))
    return point


# --- report ----------------------------------------------------------------------------------------------------


def report_lines(results: list[dict], args) -> list[str]:
    runs = " ".join(args.runs_given)
    lines = [
        "# Quality against training CPU minutes",
        "",
        f"{args.n:,} samples per point, one run, BloodNet features, each checkpoint's EMA weights and saved sampler "
        "defaults; CPU minutes are the training process's CPU time, on the CPUs below. Command: "
        f"`python benchmarks/quality_vs_cpu.py --runs {runs} --cpu-minutes {args.cpu_minutes_given} --n {args.n}`.",
        "",
        *machine_lines(results),
        "",
        "| family | CPU-min mark | checkpoint (step, CPU-min) | FD_bloodnet ↓ | class acc. ↑ | recall ↑ "
        "| near-copies ↓ |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = r["label"] if r["label"] == r["family"] else f"{r['family']} ({r['label']})"
        if "fd_bloodnet" not in r:
            lines.append(f"| {name} | {r['mark']:g} | {r['note']} | | | | |")
            continue
        where = f"{r['model']}" if r["status"] == "fixed" else f"{r['step']}, {r['cpu_minutes']:.1f}"
        lines.append(
            f"| {name} | {r['mark']:g} | {where} | {r['fd_bloodnet']:.2f} | {r['class_accuracy']:.3f} "
            f"| {r['recall']:.3f} | {r['near_copies']:.3f} |"
        )
    return lines


def machine_lines(results: list[dict]) -> list[str]:
    """Which CPU each line trained on, and a warning where they differ: a CPU minute is not the same compute on
    another CPU (bf16 units alone change a step's cost several times), so such lines are not at equal compute."""
    trained_on = {r["label"]: r["machine"] for r in results if r.get("status") in ("at mark", "before mark")}
    lines = [f"- {label}: trained on {machine}" for label, machine in trained_on.items()]
    if len(set(trained_on.values())) > 1:
        lines.append("- **The lines trained on different CPUs, so equal CPU minutes are not equal compute here.**")
    return lines


def plot(results: list[dict], path: Path) -> None:
    """FD and class accuracy against CPU minutes (log x), one line per run; fixed points as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    scored = [r for r in results if "fd_bloodnet" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (key, title) in zip(axes, (("fd_bloodnet", "FD (BloodNet) ↓"), ("class_accuracy", "class accuracy ↑"))):
        for label in dict.fromkeys(r["label"] for r in scored):
            points = sorted((r for r in scored if r["label"] == label), key=lambda r: r["cpu_minutes"])
            style = {"marker": "*", "markersize": 12, "linestyle": "none"} if points[0]["status"] == "fixed" else {}
            ax.plot(
                [p["cpu_minutes"] for p in points], [p[key] for p in points], label=label, **{"marker": "o", **style}
            )
        ax.set_xscale("log")
        ticks = sorted({round(r["cpu_minutes"]) for r in scored if r["status"] != "before mark"})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])  # the marks, in minutes (log-scale labels overlap)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training CPU minutes")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[dict], args, out: Path) -> None:
    lines = report_lines(results, args)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "quality_vs_cpu.png")
    print("\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, type=parse_run, metavar="FAMILY[:LABEL]=RUN")
    parser.add_argument("--cpu-minutes", default="15,30,60,120,240", help="the CPU-minute marks to score")
    parser.add_argument("--point", action="append", default=[], type=parse_point, metavar="LABEL=MODEL[@MINUTES]")
    parser.add_argument("--n", type=int, default=2000, help="samples scored per point")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("reports/quality-vs-cpu"))
    args = parser.parse_args(argv)
    try:
        args.marks = cpu_minute_marks(args.cpu_minutes)
    except argparse.ArgumentTypeError as err:
        parser.error(f"--cpu-minutes {err}")
    labels = [spec.label for spec in args.runs] + [label for label, _, _ in args.point]
    if len(set(labels)) < len(labels):
        parser.error("two --runs/--point share a label; name them FAMILY:LABEL=RUN")
    args.runs_given = [f"{s.family}{'' if s.label == s.family else ':' + s.label}={s.folder}" for s in args.runs]
    args.cpu_minutes_given = ",".join(f"{m:g}" for m in args.marks)
    return args


def main(argv: list[str] | None = None, score: Score | None = None) -> list[dict]:
    """Score every run at every mark (and each --point); `score` replaces the evaluation (tests)."""
    tune_malloc()  # sampling is about 2x faster with it (bloodgen_hf/process.py), as in the CLI
    args = parse_args(argv)
    try:
        costs = {label: point_cost(model, minutes) for label, model, minutes in args.point}
    except (UsageError, ModelLoadError) as err:
        raise SystemExit(f"error: {err}") from None
    score = score or Scorer(args.n, args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.runs:
        for mark in args.marks:
            choice = choose_checkpoint(spec.folder, mark)
            if "checkpoint" not in choice:
                print(f"{spec.label} at {mark:g} CPU-minutes: {choice['note']}")
                results.append({"family": spec.family, "label": spec.label, "run": str(spec.folder), **choice})
                continue
            results.append(score_mark(spec, choice, args, args.out, score))
            write_outputs(results, args, args.out)
    for label, model, _ in args.point:
        results.append(score_fixed_point(label, model, costs[label], args, args.out, score))
    write_outputs(results, args, args.out)
    return results


if __name__ == "__main__":
    main()
