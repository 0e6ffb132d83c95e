"""Quality against training time for a DDPM run that goes on over several sessions.

    python benchmarks/fd_vs_epochs.py runs/ddpm-v2 [--checkpoint latest] [--n 2000] [--curve FILE.json]
        [--prior-steps N] [--also OTHER.json:LABEL] [--plot-only]

Turns one checkpoint's EMA weights into a pipeline (the one the run would save if it stopped there),
scores `--n` samples with the saved defaults in BloodNet features (Fréchet distance, class accuracy,
recall), and appends the point to a JSON curve file that is kept in the repo, because the checkpoints
themselves are pruned. Then it redraws the curve's PNG beside the JSON. A run that started with
`--init-from` counts its steps from 0; `--prior-steps` adds the steps its starting weights had already
trained, so the curve's epochs stay cumulative.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from bloodgen_hf.evaluation.protocol import Protocol
from bloodgen_hf.evaluation.runner import build_tools, evaluate_to_folder
from bloodgen_hf.process import tune_malloc
from bloodgen_hf.training.checkpoint import load_state, resolve_resume
from bloodgen_hf.training.core import TrainConfig
from bloodgen_hf.training.ddpm import DDPMTask


def checkpoint_pipeline(run: Path, checkpoint: Path, num_images: int):
    """The pipeline a DDPM run would have saved at `checkpoint`: its config, its EMA weights."""
    recorded = json.loads((run / "train_config.json").read_text())
    names = {f.name for f in fields(TrainConfig)} - {"extra"}
    config = TrainConfig(**{k: v for k, v in recorded.items() if k in names}, extra=recorded["extra"])
    task = DDPMTask.build(config, num_images)
    task.ema.load_state_dict(load_state(checkpoint / "training_state")["extra"]["ema"])
    task.ema.copy_to(task.models["unet"].parameters())

    class NoAccelerator:  # DDPMTask.pipeline() unwraps the live model; here it is not wrapped
        device = "cpu"

        @staticmethod
        def unwrap_model(model):
            return model

    return task.pipeline(NoAccelerator())


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    """One line per curve (a run's points, by label) in each panel: FD, class accuracy, recall, 1-NN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("fd_bloodnet", "FD (BloodNet) ↓"),
        ("class_accuracy", "class accuracy ↑"),
        ("recall", "recall ↑"),
        ("one_nn_accuracy", "1-NN accuracy (0.5 ideal)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3))
    for ax, (key, label) in zip(axes, panels):
        for name, points in curves.items():
            points = [p for p in points if key in p]  # points scored before 1-NN was recorded have none
            ax.plot([p["epochs"] for p in points], [p[key] for p in points], marker="o", label=name)
        ax.set_xlabel("cumulative epochs")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if len(curves) > 1:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_curves(main: Path, label: str, others: list[str]) -> dict[str, list[dict]]:
    """The curve file being extended (as `label`), then each `--also FILE.json[:LABEL]` (drawn, never changed)."""
    curves = {label: json.loads(main.read_text()) if main.is_file() else []}
    for item in others:
        file, _, label = item.partition(":")
        curves[label or Path(file).stem] = json.loads(Path(file).read_text())
    return curves


def main() -> None:
    tune_malloc()  # sampling is about 2x faster with it (bloodgen_hf/process.py), as in the CLI
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--num-images", type=int, default=17092, help="the run's training images (for epochs)")
    parser.add_argument("--curve", type=Path, default=Path("model_cards/images/ddpm-v2/fd_vs_epochs.json"))
    parser.add_argument("--label", help="the curve's name in the plot (default: the curve file's name)")
    parser.add_argument("--also", action="append", default=[], help="another run's curve to draw: FILE.json[:LABEL]")
    parser.add_argument("--prior-steps", type=int, default=0, help="steps trained before this run (--init-from)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the curve files, score nothing")
    args = parser.parse_args()
    args.label = args.label or args.curve.stem
    if args.plot_only:
        plot(read_curves(args.curve, args.label, args.also), args.curve.with_suffix(".png"))
        return
    checkpoint = resolve_resume(args.run, args.checkpoint)
    progress = json.loads((checkpoint / "progress.json").read_text())
    pipe = checkpoint_pipeline(args.run, checkpoint, args.num_images)
    pipe.set_progress_bar_config(disable=True)
    metrics = ("fd", "pr", "1nn", "accuracy")
    protocol = Protocol(runs=1, n=args.n, metrics=metrics, with_floor=False)
    out = args.run / "fd_vs_epochs" / checkpoint.name
    tools = build_tools("bloodnet", metrics, resolution=pipe.resolution)  # the bundled BloodNet of the run's size
    result = evaluate_to_folder(pipe, str(checkpoint), out, *tools, protocol, args.data_dir)
    batch = json.loads((args.run / "train_config.json").read_text())["batch_size"]
    step = args.prior_steps + progress["step"]
    point = {
        "step": step,
        "epochs": round(step * batch / args.num_images, 2),
        "n": args.n,
        "fd_bloodnet": result["metrics"]["fd_bloodnet"]["mean"],
        "class_accuracy": result["metrics"]["class_accuracy"]["mean"],
        "recall": result["metrics"]["recall_bloodnet"]["mean"],
        "one_nn_accuracy": result["metrics"]["one_nn_accuracy_bloodnet"]["mean"],
        "per_class_accuracy": {k: round(v["mean"], 3) for k, v in result["per_class"]["class_accuracy"].items()},
    }
    curves = read_curves(args.curve, args.label, args.also)
    points = curves[args.label] = sorted(
        [p for p in curves[args.label] if p["step"] != point["step"]] + [point], key=lambda p: p["step"]
    )
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    args.curve.write_text(json.dumps(points, indent=2) + "\n")
    plot(curves, args.curve.with_suffix(".png"))
    print(json.dumps(point, indent=2))


if __name__ == "__main__":
    main()
