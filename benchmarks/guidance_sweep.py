"""Classifier-free guidance sweep: Fréchet distance, class accuracy, recall and 1-NN against the guidance scale.

    python benchmarks/guidance_sweep.py --model ddpm --data-dir ../shared/data [--scales 0,1,1.5,2,3,4] [--n 2000]

For each scale, `--runs` x `--n` generated images (the model's default sampler and steps) are scored in
BloodNet features against real images, as `bloodgen-hf evaluate` does. Guidance other than 0 or 1 runs the
conditional and the unconditional UNet in one doubled batch, so it costs twice the UNet work per step;
the table shows the measured images/s. Writes <out>/guidance.png, <out>/report.md and <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bloodgen_hf.evaluation.protocol import Protocol
from bloodgen_hf.evaluation.runner import build_tools, evaluate_to_folder
from bloodgen_hf.hub import load_pipeline
from bloodgen_hf.process import tune_malloc

PANELS = (("fd_bloodnet", "Fréchet distance (BloodNet) ↓"), ("class_accuracy", "class accuracy ↑"))
PANELS += (("recall_bloodnet", "recall ↑"), ("precision_bloodnet", "precision ↑"))
PANELS += (("one_nn_accuracy_bloodnet", "1-NN accuracy (0.5 ideal)"),)


def sweep(args) -> list[dict]:
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    metrics = ("fd", "pr", "1nn", "accuracy")
    protocol = Protocol(runs=args.runs, n=args.n, metrics=metrics, with_floor=False)
    tools = build_tools("bloodnet", metrics)
    rows = []
    for scale in args.scales:
        folder = Path(args.out) / f"guidance_{scale:g}"
        result_file = folder / "results.json"
        if not result_file.is_file():
            print(f"guidance {scale:g}: {args.runs} x {args.n} images", flush=True)
            evaluate_to_folder(
                pipe, args.model, folder, *tools, protocol, args.data_dir, "all", None, {"guidance_scale": scale}
            )
        result = json.loads(result_file.read_text())
        rows.append(
            {
                "guidance": scale,
                **{key: result["metrics"][key]["mean"] for key, _ in PANELS},
                "worst_class": min(result["per_class"]["class_accuracy"].items(), key=lambda kv: kv[1]["mean"])[0],
                "worst_class_accuracy": min(v["mean"] for v in result["per_class"]["class_accuracy"].values()),
                "unet_passes_per_image": pipe.default_steps() * (1 if scale in (0, 1) else 2),
                "images_per_s": result["timing"]["images_per_s"]["mean"],
            }
        )
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.2 * len(PANELS), 3.0))
    scales = [r["guidance"] for r in rows]
    for ax, (key, label) in zip(axes, PANELS):
        ax.plot(scales, [r[key] for r in rows], marker="o")
        ax.set_xlabel("guidance scale")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict], args, out: Path) -> None:
    lines = [
        f"# Guidance sweep: {args.model}",
        "",
        f"{args.runs} x {args.n} generated images per scale, BloodNet features, the model's default sampler. "
        f"Command: `python benchmarks/guidance_sweep.py --model {args.model} --n {args.n} --runs {args.runs} "
        f"--scales {','.join(f'{s:g}' for s in args.scales)}`.",
        "",
        "Guidance other than 0 and 1 runs the UNet twice per step (conditional and unconditional), so it costs",
        "twice the UNet work. Each scale's measured images/s is in its folder's results.json (`timing`);",
        "it is only comparable between scales sampled on the same machine.",
        "",
        "| guidance | FD_bloodnet | class acc. | worst class | recall | precision | 1-NN | UNet passes per image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['guidance']:g} | {r['fd_bloodnet']:.2f} | {r['class_accuracy']:.3f} | {r['worst_class']} "
            f"{r['worst_class_accuracy']:.2f} | {r['recall_bloodnet']:.3f} | {r['precision_bloodnet']:.3f} "
            f"| {r['one_nn_accuracy_bloodnet']:.3f} | {r['unet_passes_per_image']} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


def main() -> None:
    tune_malloc()  # sampling is about 2x faster with it (bloodgen_hf/process.py), as in the CLI
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ddpm")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--scales", default="0,1,1.5,2,3,4")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", default="reports/guidance-ddpm")
    args = parser.parse_args()
    try:
        args.scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        raise SystemExit(f"error: --scales takes comma-separated numbers, got {args.scales!r}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep(args)
    plot(rows, out / "guidance.png", f"{args.model}: {args.runs} x {args.n} images per guidance scale")
    report(rows, args, out)


if __name__ == "__main__":
    main()
