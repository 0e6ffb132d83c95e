"""Sampler sweeps: Fréchet distance, class accuracy, recall and 1-NN against the guidance scale or the flow shift.

    python benchmarks/guidance_sweep.py --model ddpm --data-dir ../shared/data [--scales 0,1,1.5,2,3,4] [--n 2000]
    python benchmarks/guidance_sweep.py --model ddpm-fast --flow-shifts 0.5,1,2,3 [--steps 2]
    python benchmarks/guidance_sweep.py --model experiments/runs/ldm-64-gan-decoder/pipeline --split val

For each scale, `--runs` x `--n` generated images (the model's default sampler and steps) are scored in
BloodNet features against the real images of `--split` (val by default, so that a setting chosen here was not
chosen on the test split), at the model's own resolution, as `bloodgen-hf evaluate` does: by the bundled BloodNet
of that size (28 or 64 px) unless `--bloodnet` names another. Guidance other than 0 or 1 runs the conditional
and the unconditional UNet in one doubled batch, so it costs twice the UNet work per step;
the table shows the measured images/s. `--flow-shifts` sweeps the sigmas of a flow-matching model's solver
instead (diffusers' `flow_shift`, which a student saves with `train_student.py --sampler-shift`), at the
model's own guidance: a few-step sampler's steps move towards noise above 1 and towards the image below it.
Writes <out>/guidance.png (or flow_shift.png), <out>/report.md and <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bloodgen_hf.evaluation.protocol import Protocol
from bloodgen_hf.evaluation.runner import build_tools, evaluate_to_folder
from bloodgen_hf.pipelines.pipeline_bloodgen_ddpm import flow_shift_setting, is_flow
from bloodgen_hf.process import tune_malloc
from bloodgen_hf.registry import load_pipeline

PANELS = (("fd_bloodnet", "Fréchet distance (BloodNet) ↓"), ("class_accuracy", "class accuracy ↑"))
PANELS += (("recall_bloodnet", "recall ↑"), ("precision_bloodnet", "precision ↑"))
PANELS += (("one_nn_accuracy_bloodnet", "1-NN accuracy (0.5 ideal)"),)


def with_flow_shift(pipe, shift: float):
    """`pipe` sampling with its flow solver's sigmas shifted by `shift` (the UNet is shared)."""
    config = pipe.scheduler.config
    if not is_flow(config):
        raise SystemExit(
            f"error: --flow-shifts needs a flow-matching model; {type(pipe.scheduler).__name__} is not one"
        )
    cls = type(pipe.scheduler)
    pipe.scheduler = cls.from_config(config, **flow_shift_setting(cls, shift))
    return pipe


def sweep(args) -> list[dict]:
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    metrics = ("fd", "pr", "1nn", "accuracy")
    protocol = Protocol(runs=args.runs, n=args.n, metrics=metrics, with_floor=False)
    tools = build_tools("bloodnet", metrics, bloodnet=args.bloodnet, resolution=pipe.resolution)
    steps = {"num_inference_steps": args.steps} if args.steps else {}
    rows = []
    for value in args.values:
        folder = Path(args.out) / f"{args.axis}_{value:g}"
        result_file = folder / "results.json"
        scale = value if args.axis == "guidance" else pipe.config.default_guidance_scale
        if args.axis == "flow_shift":
            pipe = with_flow_shift(pipe, value)
        if not result_file.is_file():
            print(f"{args.axis} {value:g}: {args.runs} x {args.n} images", flush=True)
            options = {"guidance_scale": scale, **steps}
            evaluate_to_folder(pipe, args.model, folder, *tools, protocol, args.data_dir, args.split, None, options)
        result = json.loads(result_file.read_text())
        rows.append(
            {
                args.axis: value,
                "guidance": scale,
                **{key: result["metrics"][key]["mean"] for key, _ in PANELS},
                "worst_class": min(result["per_class"]["class_accuracy"].items(), key=lambda kv: kv[1]["mean"])[0],
                "worst_class_accuracy": min(v["mean"] for v in result["per_class"]["class_accuracy"].values()),
                "unet_passes_per_image": (args.steps or pipe.default_steps()) * (1 if scale in (0, 1) else 2),
                "images_per_s": result["timing"]["images_per_s"]["mean"],
            }
        )
    return rows


def plot(rows: list[dict], axis: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.2 * len(PANELS), 3.0))
    values = [r[axis] for r in rows]
    for ax, (key, label) in zip(axes, PANELS):
        ax.plot(values, [r[key] for r in rows], marker="o")
        ax.set_xlabel("guidance scale" if axis == "guidance" else "flow shift")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict], args, out: Path) -> None:
    values = ",".join(f"{v:g}" for v in args.values)
    flag = "--scales" if args.axis == "guidance" else "--flow-shifts"
    steps = f" --steps {args.steps}" if args.steps else ""
    steps += f" --bloodnet {args.bloodnet}" if args.bloodnet else ""
    lines = [
        f"# {'Guidance' if args.axis == 'guidance' else 'Flow-shift'} sweep: {args.model}",
        "",
        f"{args.runs} x {args.n} generated images per value against the {args.split} split, BloodNet features, "
        f"the model's default sampler. Command: `python benchmarks/guidance_sweep.py --model {args.model} "
        f"--n {args.n} --runs {args.runs} --split {args.split} {flag} {values}{steps}`.",
        "",
        "Guidance other than 0 and 1 runs the UNet twice per step (conditional and unconditional), so it costs",
        "twice the UNet work. Each scale's measured images/s is in its folder's results.json (`timing`);",
        "it is only comparable between scales sampled on the same machine.",
        "",
        f"| {args.axis.replace('_', ' ')} | FD_bloodnet | class acc. | worst class | recall | precision | 1-NN "
        "| UNet passes per image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r[args.axis]:g} | {r['fd_bloodnet']:.2f} | {r['class_accuracy']:.3f} | {r['worst_class']} "
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
    parser.add_argument("--flow-shifts", help="sweep the flow solver's shift instead, at the model's own guidance")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    parser.add_argument(
        "--split", default="val", choices=("train", "val", "test", "all"), help="real images scored against"
    )
    parser.add_argument("--bloodnet", help="BloodNet pipeline folder (default: the bundled one of the model's size)")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", default="reports/guidance-ddpm")
    args = parser.parse_args()
    args.axis, flag, text = (
        ("flow_shift", "--flow-shifts", args.flow_shifts) if args.flow_shifts else ("guidance", "--scales", args.scales)
    )
    try:
        args.values = [float(s) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {flag} takes comma-separated numbers, got {text!r}") from None
    if args.axis == "flow_shift" and min(args.values) <= 0:
        raise SystemExit(f"error: --flow-shifts must be above 0, got {text!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep(args)
    title = f"{args.model}: {args.runs} x {args.n} images per {args.axis.replace('_', ' ')}"
    plot(rows, args.axis, out / f"{args.axis}.png", title)
    report(rows, args, out)


if __name__ == "__main__":
    main()
