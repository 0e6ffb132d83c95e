"""Fine texture without a feature network: each model's radial power spectrum against the real images'.

    python benchmarks/texture_spectrum.py --models ddpm ddpm-fast [--n 2000] [--precision auto]

A check that does not go through BloodNet (the repo's evaluator) or any other trained network: the mean power
of the grey images' Fourier transform in rings of frequency 1..13 cycles per image (28x28), for `--n` images of
each model drawn with the class mix of `--n` random real test images (seeds from 0), divided by that real set's.
The floor is `--n` random real train images against the same test images. Blurred samples lose power in the
upper rings (ratio below 1); a sampler that adds grain gains it. Writes <out>/spectrum.png, <out>/report.md
and <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bloodgen_hf.data import load_data
from bloodgen_hf.evaluation.metrics import radial_power_spectrum
from bloodgen_hf.io import atomic_path
from bloodgen_hf.plots import panels, save_figure
from bloodgen_hf.process import tune_malloc
from bloodgen_hf.registry import load_pipeline
from bloodgen_hf.sampling import generate, resolve_precision

UPPER = 9  # rings 9..13 (the upper third of the frequencies): the "fine texture" column


def random_images(split: str, n: int, data_dir: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    data = load_data("bloodmnist", split, 28, data_dir)
    if n > len(data.labels):
        raise SystemExit(f"error: --n {n} is more than the {len(data.labels)} images of the {split} split")
    pick = np.random.default_rng(seed).permutation(len(data.labels))[:n]  # the splits are ordered by class
    return data.images[pick], data.labels[pick]


def model_images(model: str, labels: np.ndarray, precision: str) -> tuple[np.ndarray, str]:
    pipe = load_pipeline(model)
    resolved = resolve_precision(precision, pipe)
    batches = generate(pipe, labels, seed=0, batch_size=250, precision=resolved)
    return np.concatenate([images for images, _, _ in batches]), resolved


def measure(args) -> list[dict]:
    real, labels = random_images("test", args.n, args.data_dir, seed=0)
    reference = radial_power_spectrum(real)
    sets = [("real train images (floor)", random_images("train", args.n, args.data_dir, seed=1)[0], "")]
    for model in args.models:
        print(f"{model}: {args.n} images", flush=True)
        images, precision = model_images(model, labels, args.precision)
        sets.append((model, images, precision))
    rows = []
    for name, images, precision in sets:
        ratio = radial_power_spectrum(images) / reference
        rows.append(
            {
                "model": name,
                "precision": precision,
                "ratio": ratio.tolist(),
                "upper_ratio": float(np.exp(np.log(ratio[UPPER - 1 :]).mean())),
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    fig, (ax,) = panels(1, 1, 5.5, 3.6)
    for row in rows:
        style = {"color": "black", "linestyle": "--"} if row["model"].startswith("real") else {"marker": "o"}
        ax.plot(range(1, len(row["ratio"]) + 1), row["ratio"], label=row["model"], **style)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("frequency (cycles per 28-pixel image)")
    ax.set_ylabel("power / real test images'")
    ax.set_title("radial power spectrum against real images", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def report(rows: list[dict], args, out: Path) -> None:
    bands = (1, 3, 5, 7, 9, 11, 13)
    lines = [
        "# Texture: radial power spectrum against real images",
        "",
        f"`python benchmarks/texture_spectrum.py --models {' '.join(args.models)} --n {args.n} "
        f"--precision {args.precision}`: {args.n} images each, the class mix of {args.n} random real test images, "
        "power of the grey images per frequency ring divided by those real images' (1 = the same).",
        "",
        "![spectrum](spectrum.png)",
        "",
        "| images | precision | " + " | ".join(f"f={b}" for b in bands) + f" | f={UPPER}-13 (geometric mean) |",
        "|---|---|" + "---|" * (len(bands) + 1),
    ]
    for r in rows:
        cells = " | ".join(f"{r['ratio'][b - 1]:.2f}" for b in bands)
        lines.append(f"| {r['model']} | {r['precision']} | {cells} | **{r['upper_ratio']:.2f}** |")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


def main() -> None:
    tune_malloc()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ddpm", "ddpm-fast"])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto (as `bloodgen-hf sample`)")
    parser.add_argument("--out", default="reports/texture-spectrum")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(args)
    plot(rows, out / "spectrum.png")
    report(rows, args, out)


if __name__ == "__main__":
    main()
