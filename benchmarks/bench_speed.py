"""Which process settings make DDPM sampling faster on this machine: malloc tuning, batch size, threads,
channels_last, inference_mode and bf16 autocast, each measured in a fresh process against the plain baseline.

    python benchmarks/bench_speed.py [--model ddpm] [--n 500] [--steps 10]

Every configuration samples the same n images (the CLI's code path, `bloodgen_hf.sampling.generate`,
no PNG writing) in its own interpreter, so malloc settings and thread pools do not leak between them.
Prints images/s and the ratio to the baseline (glibc malloc defaults, batch 250, 2 threads,
contiguous tensors, no_grad, fp32), and whether the images are bit-identical to the baseline's (bf16 rounds,
so its images differ; `bloodgen-hf evaluate --precision` measures what that does to quality).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

BASELINE = {
    "tune_malloc": False,
    "batch_size": 250,
    "threads": 2,
    "channels_last": False,
    "inference_mode": False,
    "precision": "fp32",
}
VARIANTS = [
    {},
    {"tune_malloc": True},
    {"tune_malloc": True, "batch_size": 64},
    {"tune_malloc": True, "batch_size": 125},
    {"tune_malloc": True, "batch_size": 500},
    {"tune_malloc": True, "batch_size": 1000},
    {"tune_malloc": True, "threads": 1},
    {"tune_malloc": True, "channels_last": True},
    {"tune_malloc": True, "inference_mode": True},
    {"tune_malloc": True, "channels_last": True, "inference_mode": True},
    {"tune_malloc": True, "precision": "bf16"},
    {"tune_malloc": True, "precision": "bf16", "batch_size": 500},
    {"tune_malloc": True, "precision": "bf16", "channels_last": True},
]


def worker(config: dict) -> None:
    """Sample in this process with `config`; print one JSON line (images/s and a hash of the images)."""
    import torch

    from bloodgen_hf.process import tune_malloc
    from bloodgen_hf.registry import load_pipeline
    from bloodgen_hf.sampling import generate, plan_labels

    if config["tune_malloc"]:
        tune_malloc()
    torch.set_num_threads(config["threads"])
    pipe = load_pipeline(config["model"])
    if config["channels_last"]:
        pipe.unet.to(memory_format=torch.channels_last)
    kwargs = {"num_inference_steps": config["steps"]} if config["steps"] else {}
    kwargs["precision"] = config["precision"]
    labels = plan_labels(config["n"])
    context = torch.inference_mode() if config["inference_mode"] else torch.no_grad()
    digest = hashlib.sha256()
    with context:
        list(generate(pipe, labels[: config["batch_size"]], batch_size=config["batch_size"], progress=False, **kwargs))
        started = time.perf_counter()
        for images, _, _ in generate(pipe, labels, batch_size=config["batch_size"], progress=False, **kwargs):
            digest.update(images.tobytes())
        seconds = time.perf_counter() - started
    print(json.dumps({"images_per_s": config["n"] / seconds, "sha256": digest.hexdigest()}))


def measure(config: dict) -> dict:
    env = {**os.environ, "BLOODGEN_TUNE_MALLOC": "1" if config["tune_malloc"] else "0"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"worker failed for {config}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(variant: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in variant.items()) or "baseline"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ddpm")
    parser.add_argument("--n", type=int, default=500, help="images per configuration (after one warm-up batch)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    print(f"model {args.model}, n={args.n}, steps {args.steps or 'default'}, {os.cpu_count()} CPUs")
    base = None
    for variant in VARIANTS:
        result = measure({**BASELINE, **variant, "model": args.model, "n": args.n, "steps": args.steps})
        base = base or result
        same = "identical" if result["sha256"] == base["sha256"] else "differ"
        ratio = result["images_per_s"] / base["images_per_s"]
        print(f"{describe(variant):55s} {result['images_per_s']:7.1f} img/s  {ratio:5.2f} x  images {same}", flush=True)


if __name__ == "__main__":
    main()
