"""Time the README's command, `bloodgen-hf sample --n 10000`, end to end for the default model, its
10-step teacher and the GAN, in one run, and print the ratios.

    python benchmarks/bench_sample.py [--n 10000] [--models default,ddpm,gan] [--format png]

Each model runs the real CLI in a fresh process (start-up, imports, loading, sampling and writing the
PNGs all count), one after the other. The target (issue 14): the default model writes 10,000 PNGs in
<= 60 s on this project's 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bloodgen_hf.process import cpu_name

TARGET_SECONDS = 60.0


def time_sample(model: str | None, n: int, fmt: str, folder: Path) -> float:
    """Wall seconds of one `bloodgen-hf sample` process (the default model when `model` is None)."""
    out = folder / f"{model or 'default'}.{fmt}"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--models", default="default,ddpm,gan", help="'default' = no --model (the README command)")
    parser.add_argument("--format", choices=["png", "npz"], default="png")
    args = parser.parse_args()
    from bloodgen_hf.cli import DEFAULT_MODEL

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(f"bloodgen-hf sample --n {args.n} --format {args.format}; {os.cpu_count()} CPUs ({cpu_name()})")
    print(f"default model: {DEFAULT_MODEL}")
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            times[model] = time_sample(None if model == "default" else model, args.n, args.format, Path(tmp))
            print(f"{model:12s} {times[model]:8.1f} s  {args.n / times[model]:7.0f} images/s", flush=True)
    if "default" in times:
        for model, seconds in times.items():
            if model != "default":
                print(f"default vs {model:10s} {seconds / times['default']:6.2f} x faster")
    if args.n == 10_000 and args.format == "png":
        for model, seconds in times.items():
            verdict = "meets" if seconds <= TARGET_SECONDS else "MISSES"
            ratio = seconds / TARGET_SECONDS
            print(f"target {TARGET_SECONDS:.0f} s for 10,000 PNGs: {model} {verdict} it ({ratio:.2f} of it)")


if __name__ == "__main__":
    main()
