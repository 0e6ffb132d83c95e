"""Time the README's command, `bloodgen-hf sample --n 10000`, end to end for the default model, its
10-step teacher and the GAN, or any bundled models and pipeline folders (a 64 px latent model beside the 28 px
default), in one run, and print each against the baseline.

    python benchmarks/bench_sample.py [--n 10000] [--models default,ddpm,gan] [--baseline default] [--format png]
    python benchmarks/bench_sample.py --models ddpm-fast runs/ldm-student/pipeline

Each model runs the real CLI in a fresh process (start-up, imports, loading, sampling and writing the
PNGs all count), one after the other; the image size each wrote is printed beside its time. The targets,
on this project's 2-core CPU: 10,000 PNGs at 28x28 in <= 60 s (issue 14), at 64x64 in <= 120 s (issue 34).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bloodgen_hf.process import cpu_name

TARGET_SECONDS = {"28x28": 60.0, "64x64": 120.0}  # 10,000 PNGs of that size


def time_sample(model: str | None, n: int, fmt: str, out: Path) -> float:
    """Wall seconds of one `bloodgen-hf sample` process writing to `out` (the default model when `model` is None)."""
    command = [
        shutil.which("bloodgen-hf") or "bloodgen-hf",
        "sample",
        "--n",
        str(n),
        "--format",
        fmt,
        "--out",
        str(out),
    ]
    command += ["--model", model] if model else []
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {proc.stderr.strip().splitlines()[-1]}")
    return seconds


def image_size(out: Path, fmt: str) -> str:
    """ "HxW" of the images a `sample` run wrote to `out` (a PNG folder or an npz)."""
    if fmt == "npz":
        with np.load(out) as archive:
            height, width = archive["images"].shape[1:3]
        return f"{height}x{width}"
    with Image.open(next(out.rglob("*.png"))) as image:
        return f"{image.height}x{image.width}"


def parse_models(given: list[str]) -> list[str]:
    """Model names and folders, given apart (`--models a b`) or comma-joined (`--models a,b`) or both."""
    return [m.strip() for item in given for m in item.split(",") if m.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["default,ddpm,gan"],
        help="bundled names or pipeline folders; 'default' = no --model (the README command)",
    )
    parser.add_argument(
        "--baseline", help="the model the others are compared with (default: 'default' if timed, else the first)"
    )
    parser.add_argument("--format", choices=["png", "npz"], default="png")
    args = parser.parse_args()
    from bloodgen_hf.cli import DEFAULT_MODEL

    models = parse_models(args.models)
    baseline = args.baseline or ("default" if "default" in models else models[0])
    if baseline not in models:
        parser.error(f"--baseline {baseline} is not one of --models {', '.join(models)}")
    print(f"bloodgen-hf sample --n {args.n} --format {args.format}; {os.cpu_count()} CPUs ({cpu_name()})")
    print(f"default model: {DEFAULT_MODEL}")
    times, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, model in enumerate(models):
            out = Path(tmp) / f"{i}.{args.format}"
            times[model] = time_sample(None if model == "default" else model, args.n, args.format, out)
            sizes[model] = image_size(out, args.format)
            rate = args.n / times[model]
            print(f"{model:12s} {times[model]:8.1f} s  {rate:7.0f} images/s  {sizes[model]}", flush=True)
    for model, seconds in times.items():
        if model != baseline:
            print(f"{baseline} vs {model:10s} {seconds / times[baseline]:6.2f} x faster")
    if args.n == 10_000 and args.format == "png":
        for model, seconds in times.items():
            target = TARGET_SECONDS.get(sizes[model])
            if target is None:
                print(f"no target for {sizes[model]} PNGs: {model}")
                continue
            verdict = "meets" if seconds <= target else "MISSES"
            goal = f"target {target:.0f} s for 10,000 {sizes[model]} PNGs"
            print(f"{goal}: {model} {verdict} it ({seconds / target:.2f} of it)")


if __name__ == "__main__":
    main()
