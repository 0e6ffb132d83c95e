"""How well each autoencoder reproduces real cells on a split it never trained on: the floor its latent model can reach.

    python benchmarks/autoencoder_report.py --autoencoders stage-1=experiments/runs/autoencoder-64-l1/pipeline \
        stage-2=experiments/runs/autoencoder-64/pipeline --bloodnet experiments/runs/bloodnet-64/pipeline \
        --data-dir ../shared/data --out experiments/reports/autoencoder-64

For each LABEL=FOLDER (a saved diffusers AutoencoderKL) it reconstructs the whole `--split` (default test) through
the posterior mean and reports PSNR and SSIM (per image, then averaged) and, with `--bloodnet` (a BloodNet trained
at the autoencoders' size on the train split), the FD between the reconstructions' and the originals' BloodNet
features (evaluation/reconstruction.py), and the share of reconstructions that BloodNet puts in their cell's class
beside its accuracy on the originals: how much of each cell's class the decoder keeps (a guided latent model can
score above it by drawing only typical cells). Writes results.json,
report.md and reconstructions.png: rows of real cells (one per class), each above every autoencoder's
reconstructions of them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from bloodgen_hf.data import load_data
from bloodgen_hf.evaluation.features import BloodNetExtractor
from bloodgen_hf.evaluation.reconstruction import reconstruct, reconstruction_report
from bloodgen_hf.io import atomic_path, labelled_class_grid, write_durably
from bloodgen_hf.process import cpu_name
from bloodgen_hf.registry import load_component

PER_CLASS = 8  # real cells per class in the picture


def parse_item(item: str) -> tuple[str, Path]:
    label, sep, folder = item.partition("=")
    if not sep or not label or not folder:
        raise SystemExit(f"--autoencoders takes LABEL=FOLDER items, got {item!r}")
    return label, Path(folder)


def picture_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first `per_class` images of each class (fewer if a class has fewer), class by class: the same cells for
    every autoencoder."""
    per_class = min(per_class, *np.bincount(labels)[np.unique(labels)])
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])


def report_markdown(rows: list[dict], split: str, real_accuracy: float | None) -> str:
    has_fd = real_accuracy is not None
    head = "| autoencoder | PSNR (dB) | SSIM |" + (" FD_bloodnet | class accuracy |" if has_fd else "")
    lines = [
        f"# Autoencoder reconstructions: {split} split, {rows[0]['num_images']:,} images at {rows[0]['resolution']} px",
        "",
        "Posterior-mean reconstructions, rounded to uint8. PSNR and SSIM per image, averaged; FD in the features of "
        "a BloodNet trained at the same size on the train split: the floor a latent model decoded by that "
        "autoencoder can reach. Class accuracy: the share of reconstructions that BloodNet puts in their cell's "
        "class, what the decoder keeps of a cell's class (a guided latent model can score above it by drawing "
        "typical cells)" + (f" (BloodNet on the originals: {real_accuracy:.4f})." if has_fd else "."),
        "",
        head,
        "|---|---|---|" + ("---|---|" if has_fd else ""),
    ]
    for row in rows:
        fd = f" {row['fd_bloodnet']:.3f} | {row['class_accuracy']:.4f} |" if has_fd else ""
        lines.append(f"| {row['label']} | {row['psnr']:.2f} | {row['ssim']:.4f} |{fd}")
    lines += ["", "![real cells above each autoencoder's reconstructions](reconstructions.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoencoders", nargs="+", required=True, metavar="LABEL=FOLDER")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--bloodnet", default=None, help="a BloodNet folder at the autoencoders' size: adds the FD")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    items = [parse_item(item) for item in args.autoencoders]
    extractor = BloodNetExtractor.load(args.bloodnet) if args.bloodnet else None
    autoencoders = [(label, folder, load_component(AutoencoderKL, folder).eval()) for label, folder in items]
    resolutions = {int(vae.config.sample_size) for _, _, vae in autoencoders}
    if len(resolutions) > 1:
        raise SystemExit(f"the autoencoders make images of different sizes ({sorted(resolutions)}); compare one size")
    resolution = resolutions.pop()
    data = load_data("bloodmnist", args.split, resolution, args.data_dir)  # read, and its features taken, once
    images, labels, names = np.asarray(data.images), np.asarray(data.labels), list(data.class_names)
    real = extractor.extract(images, progress=False, desc="real") if extractor else None
    real_accuracy = float((real.probs.argmax(1) == labels).mean()) if real else None  # the reference
    chosen = picture_indices(labels, PER_CLASS)
    rows, pictures = [], [images[chosen]]
    for label, folder, vae in autoencoders:
        reconstructions = reconstruct(vae, images)
        report = reconstruction_report(
            vae,
            images,
            extractor,
            reconstructions=reconstructions,
            real_features=real.features if real else None,
            labels=labels,
        )
        rows.append({"label": label, "model": str(folder), "split": args.split, "resolution": resolution, **report})
        pictures.append(reconstructions[chosen])
        print(f"{label}: PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"cpu": cpu_name(), "bloodnet_accuracy_on_originals": real_accuracy, "rows": rows}
    write_durably(args.out / "results.json", json.dumps(results, indent=2))
    write_durably(args.out / "report.md", report_markdown(rows, args.split, real_accuracy))
    stacked = np.concatenate([p.reshape(len(names), -1, *p.shape[1:]) for p in pictures], axis=1)
    row_names = [f"{n} (real, then {', '.join(label for label, _ in items)})" for n in names]
    with atomic_path(args.out / "reconstructions.png") as tmp:
        labelled_class_grid(stacked, row_names, scale=1).save(tmp, format="PNG")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
