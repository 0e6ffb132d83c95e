"""DDPM recipe ablation at an equal CPU budget: which training options buy quality per CPU-minute.

    python benchmarks/ablate_ddpm.py --data-dir ../shared/data [--cpu-minutes 14] [--configs base,snr5,...]

Every config trains `train_scripts/train_ddpm.py` from the same seed on the same data until it has
used `--cpu-minutes` of process CPU time (`--cpu-budget-minutes`; CPU time rather than wall time, so
other work on the machine does not shift the budget), with a constant learning rate after warm-up
(no schedule that assumes a length). Each is then scored by `bloodgen-hf evaluate` on 2,000 samples
(one run, BloodNet features, the saved pipeline's default sampler, guidance 1): Fréchet distance,
class accuracy per class, recall. Training images/s come from the run's own log.

Writes <out>/results.json and <out>/report.md; finished configs are kept, so a rerun continues.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bloodgen_hf.process import cpu_name

ROOT = Path(__file__).resolve().parents[1]
# name -> (what it changes, train_ddpm.py options): one factor at a time against `base`, today's recipe.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "base": ("v-prediction, plain MSE, uniform batches, small UNet 32/64/64", []),
    "snr5": ("+ min-SNR-5 loss weighting", ["--snr-gamma", "5"]),
    "balanced": ("+ class-balanced batches", ["--balanced-batches"]),
    "flow": ("flow matching instead of v-prediction", ["--prediction-type", "flow"]),
    "wide": ("UNet 64/128/128", ["--channels", "64,128,128"]),
    "deep": ("2 resnets per level", ["--layers-per-block", "2"]),
    "attn2": ("self-attention at 14x14 too", ["--attention-levels", "2"]),
}
COMMON = ["--lr-schedule", "constant", "--lr-warmup-steps", "200", "--seed", "0", "--split", "all"]
COMMON += ["--log-with", "none", "--checkpoint-every", "100000", "--epochs", "1000", "--grid-per-class", "4"]


def run(command: list[str], log: Path) -> None:
    print("+", " ".join(command), flush=True)
    with open(log, "a") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"error: {command[1]} failed (exit {done.returncode}); see {log}")


def score_samples(model: str, out: Path, n: int, data_dir: str, log: Path, *options: str) -> dict:
    """`bloodgen-hf evaluate` of one run of n samples (FD, precision/recall, class accuracy) into `out`,
    with any sampling `options` (e.g. `--steps 2`); returns its results.json."""
    command = [sys.executable, "-m", "bloodgen_hf.cli", "evaluate", "--model", model, "--runs", "1", "--n", str(n)]
    command += ["--extractor", "bloodnet", "--metrics", "fd,pr,accuracy", "--no-floor", "--data-dir", data_dir]
    run([*command, "--out", str(out), "--overwrite", *options], log)
    return json.loads((out / "results.json").read_text())


def train_and_score(name: str, options: list[str], args, out: Path) -> dict:
    folder = out / "runs" / name
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished run starts again from scratch
    folder.mkdir(parents=True)
    log = folder / "log.txt"
    train = [sys.executable, "train_scripts/train_ddpm.py", "--data-dir", args.data_dir, "--output-dir", str(folder)]
    train += [*COMMON, "--cpu-budget-minutes", str(args.cpu_minutes), *options]
    run(train, log)
    scores = score_samples(str(folder / "pipeline"), folder / "eval", args.n, args.data_dir, log)
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    result = {
        "config": name,
        "options": options,
        "steps": logged[-1]["step"],
        "epochs": logged[-1]["step"] * 64 / 17092,
        "cpu_minutes": logged[-1]["cpu_minutes"],
        "train_images_per_s": logged[-1]["images_per_s"],
        "parameters": scores["parameters"]["total"],
        "fd_bloodnet": scores["metrics"]["fd_bloodnet"]["mean"],
        "class_accuracy": scores["metrics"]["class_accuracy"]["mean"],
        "recall": scores["metrics"]["recall_bloodnet"]["mean"],
        "per_class_accuracy": {k: v["mean"] for k, v in scores["per_class"]["class_accuracy"].items()},
        "sampling_images_per_s": scores["timing"]["images_per_s"],
        "machine": cpu_name(),  # CPU time buys different work on another CPU: rows compare on one machine
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def report(results: list[dict], args, out: Path) -> None:
    lines = [
        "# DDPM recipe ablation",
        "",
        f"Each config: {args.cpu_minutes} CPU-minutes of training (2-core CPU, seed 0, all 17,092 images,",
        "batch 64, constant LR 3e-4 after 200 warm-up steps), then 2,000 samples (DPM-Solver++ 10 steps, guidance 1)",
        f"scored in BloodNet features. Command: `python benchmarks/ablate_ddpm.py --cpu-minutes {args.cpu_minutes}"
        f" --n {args.n}`.",
        "",
        "| config | change | params | train img/s | steps | FD_bloodnet | class acc. | worst class | recall | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        worst = min(r["per_class_accuracy"].items(), key=lambda kv: kv[1])
        lines.append(
            f"| {r['config']} | {CONFIGS[r['config']][0]} | {r['parameters'] / 1e6:.2f}M "
            f"| {r['train_images_per_s']:.1f} | {r['steps']} | {r['fd_bloodnet']:.2f} | {r['class_accuracy']:.3f} "
            f"| {worst[0]} {worst[1]:.2f} | {r['recall']:.3f} | {r.get('machine', 'not recorded')} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--cpu-minutes", type=float, default=14.0)
    parser.add_argument("--n", type=int, default=2000, help="samples scored per config")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default="reports/ablation-ddpm")
    args = parser.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown configs {unknown}; choose from: {', '.join(CONFIGS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        results.append(train_and_score(name, CONFIGS[name][1], args, out))
        report(results, args, out)


if __name__ == "__main__":
    main()
