"""How well each autoencoder reproduces real cells on a split it never trained on: the floor its latent model can reach.

    python benchmarks/autoencoder_report.py --autoencoders stage-1=experiments/runs/autoencoder-64-l1/pipeline \
        stage-2=experiments/runs/autoencoder-64/pipeline --bloodnet experiments/runs/bloodnet-64/pipeline \
        --data-dir ../shared/data --out experiments/reports/autoencoder-64

    python benchmarks/autoencoder_report.py --autoencoders v2=vae \
        v2-240min=experiments/reports/quality-vs-cpu/points/vae/240min/pipeline \
        --bundled-bloodnet --data-dir ../shared/data --out experiments/reports/vae-reconstructions

For each LABEL=MODEL (a saved diffusers AutoencoderKL folder, or a class-conditional VAE pipeline: a bundled name
such as `vae` or its folder, whose images go through their own class) it reconstructs the whole `--split` (default
test) through the posterior mean and reports PSNR and SSIM (per image, then averaged) and, with `--bloodnet` (a
BloodNet trained at the autoencoders' size on the train split) or `--bundled-bloodnet`, the FD between the
reconstructions' and the originals' BloodNet features (evaluation/reconstruction.py), and the share of
reconstructions that BloodNet puts in their cell's class beside its accuracy on the originals: how much of each
cell's class the decoder keeps (a guided latent model can score above it by drawing only typical cells). Writes
results.json, report.md and reconstructions.png: rows of real cells (one per class), each above every
autoencoder's reconstructions of them. `--latent-probe` adds, for each AutoencoderKL, the class accuracy of a linear
classifier fitted on the train split's latents (evaluation/reconstruction.py `latent_probe`): what the latents keep
of each class before the decoder, so that a class the reconstructions lose can be put on the encoder or the decoder
(autoencoders with the same encoder, such as a `--freeze-encoder` stage 2 and its stage 1, share one probe).
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
from bloodgen_hf.evaluation.protocol import Protocol
from bloodgen_hf.evaluation.reconstruction import (
    encoder_fingerprint,
    latent_probe,
    reconstruct,
    reconstruct_conditional,
    reconstruction_report,
)
from bloodgen_hf.io import atomic_path, labelled_class_grid, write_durably
from bloodgen_hf.process import cpu_name
from bloodgen_hf.registry import bundled_models, load_component, load_pipeline

PER_CLASS = 8  # real cells per class in the picture


def parse_item(item: str) -> tuple[str, str]:
    label, sep, model = item.partition("=")
    if not sep or not label or not model:
        raise SystemExit(f"--autoencoders takes LABEL=MODEL items, got {item!r}")
    return label, model


def load_autoencoder(model: str):
    """(the model, its image size, whether it is class-conditional): a pipeline (bundled name or a folder with
    model_index.json) must be a class-conditional VAE pipeline; any other folder is read as an AutoencoderKL."""
    if model in bundled_models() or (Path(model) / "model_index.json").is_file():
        pipe = load_pipeline(model)
        if not hasattr(pipe, "vae") or not hasattr(pipe.vae, "prior_sample"):
            raise SystemExit(f"{model} is a {type(pipe).__name__}, not a class-conditional VAE pipeline")
        return pipe, int(pipe.vae.config.resolution), True
    vae = load_component(AutoencoderKL, Path(model)).eval()
    return vae, int(vae.config.sample_size), False


def picture_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first `per_class` images of each class (fewer if a class has fewer), class by class: the same cells for
    every autoencoder."""
    per_class = min(per_class, *np.bincount(labels)[np.unique(labels)])
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])


def worst_class(row: dict, class_names: list[str], key: str = "class_accuracy_by_class") -> str:
    """'basophil 0.623': the class whose reconstructions BloodNet recognises least, or with `key`
    'probe_accuracy_by_class' the class the latent probe finds least (rows without it: '-')."""
    by_class = row.get(key)
    if not by_class:
        return "-"
    index, accuracy = min(by_class.items(), key=lambda item: item[1])
    return f"{class_names[int(index)]} {accuracy:.3f}"


def report_markdown(rows: list[dict], split: str, real_accuracy: float | None, class_names: list[str]) -> str:
    has_fd = real_accuracy is not None
    has_probe = any("probe_accuracy" in row for row in rows)
    fd_columns = " FD_bloodnet | class accuracy | worst class | precision / recall |"
    head = "| autoencoder | PSNR (dB) | SSIM |" + (fd_columns if has_fd else "")
    head += " latent probe | its worst class |" if has_probe else ""
    lines = [
        f"# Autoencoder reconstructions: {split} split, {rows[0]['num_images']:,} images at {rows[0]['resolution']} px",
        "",
        "Posterior-mean reconstructions, rounded to uint8. PSNR and SSIM per image, averaged; FD in the features of "
        "a BloodNet trained at the same size on the train split: the floor that samples decoded by the same "
        "decoder (a latent model's, or a VAE's own from its prior) can reach. Class accuracy: the share of "
        "reconstructions that BloodNet puts in their cell's class, what the decoder keeps of a cell's class "
        "(a guided latent model can score above it by drawing "
        "typical cells)"
        + (f" (BloodNet on the originals: {real_accuracy:.4f})." if has_fd else ".")
        + (
            f" Precision / recall: k-NN (k = {Protocol.nearest_k}) in the same features against the originals, as "
            "`evaluate` scores samples; a kind of cell the decoder cannot draw is one a latent model's samples "
            "cannot cover."
            if has_fd
            else ""
        ),
        "",
        head,
        "|---|---|---|" + ("---|---|---|---|" if has_fd else "") + ("---|---|" if has_probe else ""),
    ]
    for row in rows:
        worst = worst_class(row, class_names)
        manifold = f"{row['precision']:.3f} / {row['recall']:.3f}" if "recall" in row else "-"
        fd = f" {row['fd_bloodnet']:.3f} | {row['class_accuracy']:.4f} | {worst} | {manifold} |" if has_fd else ""
        probe = ""
        if has_probe:
            accuracy = f"{row['probe_accuracy']:.4f}" if "probe_accuracy" in row else "-"
            probe = f" {accuracy} | {worst_class(row, class_names, 'probe_accuracy_by_class')} |"
        lines.append(f"| {row['label']} | {row['psnr']:.2f} | {row['ssim']:.4f} |{fd}{probe}")
    if has_probe:
        lines += [
            "",
            "Latent probe: the accuracy on this split of a linear classifier fitted on the train split's posterior "
            "means, what the latents keep of each class before any decoder (a lower bound; class-conditional VAEs: "
            "-). A class the probe finds and the reconstructions lose is lost in the decoder.",
        ]
    lines += ["", "![real cells above each autoencoder's reconstructions](reconstructions.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoencoders", nargs="+", required=True, metavar="LABEL=MODEL")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--bloodnet", default=None, help="a BloodNet folder at the autoencoders' size: adds the FD")
    parser.add_argument("--bundled-bloodnet", action="store_true", help="the bundled BloodNet at that size instead")
    parser.add_argument("--latent-probe", action="store_true", help="a linear probe of each AutoencoderKL's latents")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    items = [parse_item(item) for item in args.autoencoders]
    autoencoders = [(label, model, *load_autoencoder(model)) for label, model in items]
    resolutions = {size for _, _, _, size, _ in autoencoders}
    if len(resolutions) > 1:
        raise SystemExit(f"the autoencoders make images of different sizes ({sorted(resolutions)}); compare one size")
    resolution = resolutions.pop()
    extractor = None
    if args.bloodnet or args.bundled_bloodnet:
        extractor = BloodNetExtractor.load(args.bloodnet, resolution=resolution)
    data = load_data("bloodmnist", args.split, resolution, args.data_dir)  # read, and its features taken, once
    images, labels, names = np.asarray(data.images), np.asarray(data.labels), list(data.class_names)
    real = extractor.extract(images, progress=False, desc="real") if extractor else None
    real_accuracy = float((real.probs.argmax(1) == labels).mean()) if real else None  # the reference
    train = load_data("bloodmnist", "train", resolution, args.data_dir) if args.latent_probe else None
    chosen = picture_indices(labels, PER_CLASS)
    rows, pictures, probes = [], [images[chosen]], {}  # probes: {encoder fingerprint: its latent probe}
    for label, model, autoencoder, _, conditional in autoencoders:
        if conditional:
            reconstructions = reconstruct_conditional(autoencoder, images, labels)
        else:
            reconstructions = reconstruct(autoencoder, images)
        report = reconstruction_report(
            autoencoder,
            images,
            extractor,
            reconstructions=reconstructions,
            real_features=real.features if real else None,
            labels=labels,
        )
        if train is not None and not conditional:
            key = encoder_fingerprint(autoencoder)
            if key not in probes:
                probes[key] = latent_probe(
                    autoencoder, np.asarray(train.images), np.asarray(train.labels), images, labels
                )
            report.update(probes[key], encoder_sha256=key)
        rows.append({"label": label, "model": model, "split": args.split, "resolution": resolution, **report})
        pictures.append(reconstructions[chosen])
        print(f"{label}: PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"cpu": cpu_name(), "bloodnet_accuracy_on_originals": real_accuracy, "rows": rows}
    write_durably(args.out / "results.json", json.dumps(results, indent=2))
    write_durably(args.out / "report.md", report_markdown(rows, args.split, real_accuracy, names))
    stacked = np.concatenate([p.reshape(len(names), -1, *p.shape[1:]) for p in pictures], axis=1)
    row_names = [f"{n} (real, then {', '.join(label for label, _ in items)})" for n in names]
    with atomic_path(args.out / "reconstructions.png") as tmp:
        labelled_class_grid(stacked, row_names, scale=1).save(tmp, format="PNG")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
