"""Time `bloodgen-hf sample --n N` (default 10,000) for a model, against a naive baseline.

    python benchmarks/bench_sample.py [--model gan] [--n 10000] [--format png|npz] [--threads 2]

Prints images/s for (1) the CLI's code path (per-image seeds, batched generation, threaded PNG
writes, atomic output) and (2) a naive loop (PIL output, one single-threaded `Image.save` per
image with default compression), the ratio between them, and the issue's target
(10,000 GAN images in <= 30 s on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bloodgen_hf.hub import load_pipeline
from bloodgen_hf.sampling import generate, plan_labels, write_npz, write_png_folder

TARGET_SECONDS = {"gan": 30.0}


def ours(pipe, n: int, out: Path, fmt: str, batch_size: int) -> float:
    started = time.perf_counter()
    batches = generate(pipe, plan_labels(n), seed=0, batch_size=batch_size, progress=False)
    (write_npz if fmt == "npz" else write_png_folder)(batches, out, {"benchmark": True})
    return time.perf_counter() - started


def naive(pipe, n: int, out: Path, batch_size: int) -> float:
    started = time.perf_counter()
    out.mkdir()
    generator = torch.Generator().manual_seed(0)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        labels = [(start + i) % 8 for i in range(count)]
        for i, image in enumerate(pipe(count, class_labels=labels, generator=generator).images):
            image.save(out / f"{start + i:06d}.png")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gan")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--format", choices=["png", "npz"], default="png")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    pipe = load_pipeline(args.model)
    load_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        ours_s = ours(pipe, args.n, Path(tmp) / f"ours.{args.format}", args.format, args.batch_size)
        naive_s = naive(pipe, args.n, Path(tmp) / "naive", args.batch_size)
    print(f"model {args.model}, n={args.n}, format {args.format}, torch threads {args.threads}")
    print(f"load pipeline        {load_s:7.2f} s")
    print(f"bloodgen-hf sample   {ours_s:7.2f} s  {args.n / ours_s:8.0f} images/s")
    print(f"naive loop           {naive_s:7.2f} s  {args.n / naive_s:8.0f} images/s")
    print(f"speed-up vs naive    {naive_s / ours_s:7.2f} x")
    if args.model in TARGET_SECONDS and args.n == 10_000:
        target = TARGET_SECONDS[args.model]
        verdict = "meets" if ours_s + load_s <= target else "MISSES"
        print(f"target               {target:7.2f} s  -> {verdict} it ({(ours_s + load_s) / target:.2f} of the budget)")


if __name__ == "__main__":
    main()
