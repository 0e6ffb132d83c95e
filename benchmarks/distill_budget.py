"""Few-step students at an equal CPU budget: reflow on teacher pairs against consistency distillation.

    python benchmarks/distill_budget.py --teacher ddpm --data-dir ../shared/data [--cpu-minutes 60]
        [--pairs-n 5000] [--steps 1,2,4] [--n 2000] [--methods reflow,consistency,reflow-u,reflow-huber,reflow-u-huber]

Both methods get `--cpu-minutes` of CPU time, counted the same way. Reflow first spends part of it on
its (noise, image) pairs: `bloodgen-hf sample --format npz` of `--pairs-n` teacher images, whose CPU
time (user + system, measured with getrusage) is taken off reflow's training budget. Consistency
distillation has no pairs and spends all of it training on the real train split. Both start from the
teacher's weights, seed 0, constant LR after warm-up, and train with `--cpu-budget-minutes`.

Each student, and the teacher at its default sampler, is then scored by `bloodgen-hf evaluate` on `--n`
samples (one run, BloodNet features) at each of `--steps` sampler steps: Fréchet distance, class
accuracy, recall, and sampling images/s on this machine. Writes <out>/report.md and <out>/results.json;
finished parts are kept, so a rerun continues.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

from ablate import ROOT, run, score_samples

from bloodgen_hf.process import cpu_name

METHODS = {  # a row: its train_student.py method and options; the reflow rows share one set of pairs
    "reflow": ("reflow", []),
    "consistency": ("consistency", []),
    "reflow-u": ("reflow", ["--reflow-time", "u-shaped"]),
    "reflow-huber": ("reflow", ["--reflow-loss", "pseudo-huber"]),
    "reflow-u-huber": ("reflow", ["--reflow-time", "u-shaped", "--reflow-loss", "pseudo-huber"]),
}
DEFAULT_METHODS = ("reflow", "consistency")
COMMON = ["--lr-schedule", "constant", "--seed", "0", "--log-with", "none", "--checkpoint-every", "100000"]
COMMON += ["--epochs", "1000", "--grid-per-class", "4"]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def make_pairs(args, out: Path) -> dict:
    """The teacher's pairs and the CPU they cost (kept in pairs.json, so a rerun does not pay again)."""
    record_file = out / "pairs.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    pairs = out / "pairs.npz"
    before = children_cpu_seconds()
    command = [sys.executable, "-m", "bloodgen_hf.cli", "sample", "--model", args.teacher, "--format", "npz"]
    run([*command, "--n", str(args.pairs_n), "--out", str(pairs), "--overwrite"], out / "pairs.log")
    record = {"file": str(pairs), "n": args.pairs_n, "cpu_minutes": (children_cpu_seconds() - before) / 60}
    record_file.write_text(json.dumps(record, indent=2))
    return record


def train_student(method: str, budget_minutes: float, pairs: dict | None, args, out: Path) -> Path:
    """The student's saved pipeline; an unfinished run starts again from scratch (`--overwrite`)."""
    folder = out / "runs" / method
    if (folder / "pipeline" / "model_index.json").is_file():
        return folder / "pipeline"
    if budget_minutes <= 0:
        raise SystemExit(f"error: the pairs took {pairs['cpu_minutes']:.1f} CPU-minutes, the whole budget")
    folder.mkdir(parents=True, exist_ok=True)
    kind, options = METHODS[method]
    command = [sys.executable, "train_scripts/train_student.py", "--teacher", args.teacher, "--method", kind, *options]
    command += ["--data-dir", args.data_dir, "--output-dir", str(folder), *COMMON]
    command += ["--cpu-budget-minutes", f"{budget_minutes:.3f}", "--batch-size", str(args.batch_size), "--overwrite"]
    command += ["--pairs", pairs["file"]] if pairs else []
    run(command, out / "runs" / f"{method}.log")
    return folder / "pipeline"


def score(model: Path | str, steps: int | None, args, folder: Path) -> dict:
    """FD, class accuracy, recall and images/s of `--n` samples, at `steps` sampler steps (None: the default)."""
    result_file = folder / "results.json"
    if result_file.is_file():
        scores = json.loads(result_file.read_text())
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        options = ["--steps", str(steps)] if steps else []
        scores = score_samples(
            str(model), folder, args.n, args.data_dir, folder.parent / f"{folder.name}.log", *options
        )
    metrics = scores["metrics"]
    return {
        "fd_bloodnet": metrics["fd_bloodnet"]["mean"],
        "class_accuracy": metrics["class_accuracy"]["mean"],
        "recall": metrics["recall_bloodnet"]["mean"],
        "images_per_s": scores["timing"]["images_per_s"]["mean"],
    }


def training_record(pipeline: Path) -> dict:
    logged = [json.loads(line) for line in (pipeline.parent / "metrics.jsonl").read_text().splitlines()]
    return {"train_steps": logged[-1]["step"], "train_cpu_minutes": logged[-1]["cpu_minutes"]}


def report(results: dict, args, out: Path) -> None:
    lines = [
        "# Few-step students at an equal CPU budget",
        "",
        f"Teacher `{args.teacher}`; {args.cpu_minutes:g} CPU-minutes per method on {cpu_name()}; reflow pays its "
        f"{args.pairs_n:,} pairs out of it. {args.n:,} samples per row, BloodNet features. Command: "
        f"`python benchmarks/distill_budget.py --teacher {args.teacher} --cpu-minutes {args.cpu_minutes:g} "
        f"--pairs-n {args.pairs_n} --steps {','.join(map(str, args.steps))} --n {args.n} "
        f"--batch-size {args.batch_size} --methods {args.methods}`.",
        "",
        "| model | pairs CPU-min | training CPU-min | training steps | sampler steps | FD_bloodnet | class acc. "
        "| recall | images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    teacher = results["teacher"]
    lines.append(
        f"| teacher | | | | default | {teacher['fd_bloodnet']:.2f} | {teacher['class_accuracy']:.3f} "
        f"| {teacher['recall']:.3f} | {teacher['images_per_s']:.1f} |"
    )
    for method in METHODS:
        entry = results.get(method)
        for steps, row in (entry or {}).get("scores", {}).items():
            pairs = f"{entry['pairs_cpu_minutes']:.1f}" if entry["pairs_cpu_minutes"] else ""
            lines.append(
                f"| {method} | {pairs} | {entry['train_cpu_minutes']:.1f} | {entry['train_steps']} | {steps} "
                f"| {row['fd_bloodnet']:.2f} | {row['class_accuracy']:.3f} | {row['recall']:.3f} "
                f"| {row['images_per_s']:.1f} |"
            )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="ddpm")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--cpu-minutes", type=float, default=60.0, help="per method, pairs included")
    parser.add_argument("--pairs-n", type=int, default=5000)
    parser.add_argument("--steps", default="1,2,4", help="sampler steps to score each student at")
    parser.add_argument("--n", type=int, default=2000, help="samples scored per row")
    parser.add_argument("--batch-size", type=int, default=64, help="students' training batch")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"rows, from {', '.join(METHODS)}")
    parser.add_argument("--out", default="reports/distill-budget")
    args = parser.parse_args()
    try:
        args.steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        raise SystemExit(f"error: --steps takes comma-separated integers, got {args.steps!r}") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS) or args.cpu_minutes <= 0 or args.pairs_n < 1:
        raise SystemExit(f"error: --methods from {', '.join(METHODS)}, --cpu-minutes > 0 and --pairs-n >= 1")
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"teacher": score(args.teacher, None, args, out / "eval" / "teacher")}
    for method in methods:
        pairs = make_pairs(args, out) if METHODS[method][0] == "reflow" else None
        spent = pairs["cpu_minutes"] if pairs else 0.0
        pipeline = train_student(method, args.cpu_minutes - spent, pairs, args, out)
        scores = {steps: score(pipeline, steps, args, out / "eval" / f"{method}-{steps}") for steps in args.steps}
        results[method] = {"pairs_cpu_minutes": spent, **training_record(pipeline), "scores": scores}
        report(results, args, out)


if __name__ == "__main__":
    main()
