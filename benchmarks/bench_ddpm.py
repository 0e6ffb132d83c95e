"""Benchmark the DDPM: sampling speed per scheduler, and our training loop against a plain diffusers loop.

    python benchmarks/bench_ddpm.py                       # small preset, random weights, a few minutes on CPU
    python benchmarks/bench_ddpm.py --model ddpm --guidance 2.0 --target-n 1000 --train-steps 100

(1) Sampling: images/s of DDPM-1000, DDIM-50, DPM-Solver++-20 and -10 (`--samplers`) on the same
UNet, batch and guidance, each as a ratio to the first; then the saved pipeline's default sampler
through `bloodgen_hf.sampling.generate` (the `bloodgen-hf sample` code path, CLI batch size) on
`--target-n` images, extrapolated to the issue's target: 10,000 images in <= 20 minutes.
(2) Training: images/s of `core.train` with DDPMTask against a plain `train_unconditional`-style loop
(a DataLoader over ready float tensors, accelerator.accumulate, clipping, AdamW + cosine, EMA) on
the same UNet, batch and data, best of `--rounds` alternating runs. Weights are random unless
`--model` is given: speed does not depend on them. Every part uses `--threads` torch threads.
(3) ODE agreement (`--agreement-n`, worth running with `--model`): the deterministic few-step samplers
against DDIM-1000 from the same starting noise, as a share of the distance between two samples.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from bloodgen_hf.data import NUM_CLASSES, LabelledImages, archive_name, to_model_range
from bloodgen_hf.pipelines import BloodDDPMPipeline
from bloodgen_hf.pipelines.pipeline_bloodgen_ddpm import make_scheduler
from bloodgen_hf.registry import load_pipeline
from bloodgen_hf.sampling import generate, plan_labels
from bloodgen_hf.training.core import TrainConfig, make_accelerator, train
from bloodgen_hf.training.ddpm import DDPMOptions, DDPMTask, build_noise_scheduler, build_unet

TARGET_IMAGES, TARGET_SECONDS = 10_000, 20 * 60


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a bundled model name or pipeline folder; default: random --preset weights")
    parser.add_argument("--preset", default="small", help="UNet preset for random weights and for training")
    parser.add_argument("--resolution", type=int, default=28, choices=(28, 64))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=16, help="images per call when comparing samplers")
    parser.add_argument("--guidance", type=float, default=None, help="default: the pipeline's default")
    parser.add_argument("--samplers", default="ddpm:1000,ddim:50,dpm++:20,dpm++:10", help="name:steps,... ('' skips)")
    parser.add_argument("--target-n", type=int, default=250, help="images for the default-sampler run; 0 skips it")
    parser.add_argument("--target-batch", type=int, default=250, help="batch of the default-sampler run (CLI's)")
    parser.add_argument("--train-steps", type=int, default=20, help="optimizer steps per training run; 0 skips")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each training loop")
    parser.add_argument("--agreement-n", type=int, default=16, help="images for the ODE agreement check; 0 skips")
    parser.add_argument("--agreement-steps", type=int, default=1000, help="DDIM steps of the agreement reference")
    parser.add_argument("--agreement-samplers", default="dpm++:10,dpm++:15,dpm++:20,unipc:10,ddim:50")
    return parser.parse_args()


def random_pipeline(preset: str, resolution: int) -> BloodDDPMPipeline:
    torch.manual_seed(0)
    noise = build_noise_scheduler("squaredcos_cap_v2", "v_prediction")
    return BloodDDPMPipeline(build_unet(preset, resolution), make_scheduler("dpm++", noise.config))


def images_per_second(pipe, n: int, steps: int, guidance: float | None) -> float:
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    started = time.perf_counter()
    pipe(n, generator=generators, num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    return n / (time.perf_counter() - started)


def bench_samplers(pipe, args) -> None:
    guidance = pipe.config.default_guidance_scale if args.guidance is None else args.guidance
    passes = 1 if guidance in (0, 1) else 2
    if not args.samplers and not args.target_n:
        return
    print(f"\n(1) sampling, batch {args.batch}, guidance {guidance} ({passes} UNet pass(es) per step)")
    images_per_second(pipe, 2, 1, guidance)  # warm-up
    reference = None
    for entry in filter(None, args.samplers.split(",")):
        name, steps = entry.split(":")
        rate = images_per_second(pipe.with_scheduler(name), args.batch, int(steps), guidance)
        reference = reference or rate
        print(
            f"  {name + '-' + steps:<12} {rate:8.2f} images/s  {rate * int(steps) * passes:7.0f} UNet images/s  "
            f"x{rate / reference:7.1f} vs {args.samplers.split(',')[0]}  "
            f"10k images: {TARGET_IMAGES / rate / 60:7.1f} min"
        )
    if args.target_n:
        default = (type(pipe.scheduler).__name__, pipe.default_steps())
        labels = plan_labels(args.target_n)
        started = time.perf_counter()
        for _ in generate(pipe, labels, batch_size=args.target_batch, progress=False, guidance_scale=guidance):
            pass
        rate = args.target_n / (time.perf_counter() - started)
        projected = TARGET_IMAGES / rate
        verdict = "meets" if projected <= TARGET_SECONDS else "MISSES"
        print(
            f"  default sampler {default[0]}-{default[1]}, {args.target_n} images via sampling.generate "
            f"(batch {args.target_batch}): {rate:.2f} images/s -> 10k images in {projected / 60:.1f} min "
            f"(projected), {verdict} the {TARGET_SECONDS // 60} min target"
        )


def bench_agreement(pipe, args) -> None:
    """Few-step solvers against many small steps, image by image. DDIM (eta 0), DPM-Solver++ and UniPC all
    solve the same probability-flow ODE, which maps each starting noise to one image; DDIM with
    `--agreement-steps` steps stands in for the exact solution. From the same per-image seeds (the same
    starting noise), each sampler's RMS pixel distance to it is printed next to the RMS distance between
    two different reference images of the same class: the size of "another sample"."""
    n, guidance = args.agreement_n, args.guidance
    labels = np.arange(n) % NUM_CLASSES

    def draw(name: str, steps: int) -> np.ndarray:
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
        out = pipe.with_scheduler(name)(
            n, class_labels=labels.tolist(), generator=generators, num_inference_steps=steps,
            guidance_scale=guidance, output_type="np",
        )  # fmt: skip
        return out.images.astype(np.float64) * 255

    def rms(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(((a - b) ** 2).mean()))

    started = time.perf_counter()
    reference = draw("ddim", args.agreement_steps)
    seconds = time.perf_counter() - started
    between = rms(reference, np.roll(reference, NUM_CLASSES, axis=0))  # same class, other noise
    print(f"\n(3) ODE agreement, {n} images, reference DDIM-{args.agreement_steps} ({seconds:.0f} s); "
          f"RMS distance 0-255 between same-class samples: {between:.1f}")  # fmt: skip
    for entry in args.agreement_samplers.split(","):
        name, steps = entry.split(":")
        distance = rms(draw(name, int(steps)), reference)
        share = distance / between
        print(f"  {name + '-' + steps:<12} RMS to reference {distance:6.2f}  = {share:6.1%} of a new sample")


def fake_archive(folder: Path, n: int, resolution: int) -> Path:
    """Random images in the MedMNIST layout: training speed does not depend on the pictures."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", n), ("val", NUM_CLASSES), ("test", NUM_CLASSES)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, resolution, resolution, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % NUM_CLASSES).reshape(-1, 1).astype(np.uint8)
    np.savez(folder / archive_name(resolution), **arrays)
    return folder


def train_config(args, data_dir: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        output_dir=str(out),
        data_dir=str(data_dir),
        resolution=args.resolution,
        split="train",
        batch_size=args.train_batch,
        epochs=1,
        max_steps=args.train_steps,
        checkpoint_every=10**9,
        sample_every=10**9,
        log_every=args.train_steps,
        log_with="none",
        extra=DDPMOptions(preset=args.preset),
    )


def our_loop(config: TrainConfig) -> float:
    """core.train with DDPMTask; its own images/s over the training loop (set-up and final save excluded)."""
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    dataset = LabelledImages.load(config.split, config.resolution, config.data_dir, flip=config.flip)
    with contextlib.redirect_stderr(io.StringIO()):  # the core's progress bar
        train(DDPMTask.build(config, len(dataset)), config, accelerator, dataset)
    last = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["images_per_s"]


def plain_loop(config: TrainConfig) -> float:
    """What diffusers' train_unconditional.py does per step, with class labels for the same UNet."""
    o = config.extra
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    unet = build_unet(o.preset, config.resolution)
    noise_scheduler = build_noise_scheduler(o.beta_schedule, o.prediction_type)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, o.lr_warmup_steps, config.max_steps)
    ema = EMAModel(unet.parameters(), decay=o.ema_max_decay, use_ema_warmup=True, power=o.ema_power)
    dataset = LabelledImages.load(config.split, config.resolution, config.data_dir)
    images = to_model_range(dataset.images)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, dataset.labels), batch_size=config.batch_size, shuffle=True
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    seen, started = 0, time.perf_counter()
    for step, (clean, labels) in enumerate(loader):
        if step == config.max_steps:
            break
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),), device=clean.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with accelerator.accumulate(unet):
            prediction = unet(noisy, timesteps, class_labels=labels).sample
            loss = F.mse_loss(prediction, noise_scheduler.get_velocity(clean, noise, timesteps))
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), o["max_grad_norm"])
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(unet.parameters())
        loss.item()  # as the example does when it logs the loss every step
        seen += len(clean)
    return seen / (time.perf_counter() - started)


def bench_training(args) -> None:
    print(f"\n(2) training, preset {args.preset}, {args.resolution}x{args.resolution}, batch {args.train_batch}, "
          f"{args.train_steps} steps per run, best of {args.rounds}")  # fmt: skip
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_archive(Path(tmp), args.train_batch * args.train_steps, args.resolution)
        for i in range(args.rounds):  # the order flips every round, so a drift in machine speed favours neither
            runs = [(plain, plain_loop, "plain"), (ours, our_loop, "ours")]
            for results, loop, name in runs[:: 1 if i % 2 == 0 else -1]:
                results.append(loop(train_config(args, data, Path(tmp) / f"{name}{i}")))
    print(f"  plain diffusers loop  {max(plain):8.2f} images/s  (runs: {', '.join(f'{r:.2f}' for r in plain)})")
    print(f"  core.train + DDPMTask {max(ours):8.2f} images/s  (runs: {', '.join(f'{r:.2f}' for r in ours)})")
    verdict = "not slower" if max(ours) >= 0.97 * max(plain) else "SLOWER"
    print(f"  ours / plain          {max(ours) / max(plain):8.3f}  -> {verdict} (3% timing tolerance)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model) if args.model else random_pipeline(args.preset, args.resolution)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in pipe.unet.parameters())
    source = args.model or f"random {args.preset} preset"
    print(f"DDPM benchmark: {source}, UNet {params / 1e6:.2f}M parameters, {pipe.unet.config.sample_size}px, "
          f"torch threads {args.threads}, sampling on cpu")  # fmt: skip
    if 0 < args.agreement_n <= NUM_CLASSES:
        raise SystemExit("--agreement-n must exceed the 8 classes (pairs of same-class images are compared)")
    bench_samplers(pipe, args)
    if args.train_steps:
        bench_training(args)
    if args.agreement_n:
        bench_agreement(pipe, args)


if __name__ == "__main__":
    main()
