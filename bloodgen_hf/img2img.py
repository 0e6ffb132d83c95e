"""Image-to-image commands of a VAE (`bloodgen-hf reconstruct` / `variations`): reading the user's
image safely, and writing the results atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bloodgen_hf.data import class_index
from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path, save_image
from bloodgen_hf.registry import load_pipeline


def read_image(path: Path) -> Image.Image:
    """An RGB image from a file, or one clear error (missing, a folder, not an image)."""
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    if path.is_dir():
        raise UsageError(f"--input {path} is a folder, not an image file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"--input {path} is not a readable image ({err})") from err


def load_vae(model: str, device: str):
    """A pipeline that can encode images; other model families are refused by name."""
    pipe = load_pipeline(model, device)
    if not hasattr(pipe, "encode"):
        raise UsageError(f"model {model!r} is a {type(pipe).__name__}, which cannot encode images; use a VAE model")
    return pipe


def check_size(image: Image.Image, path: Path, pipe) -> None:
    size = pipe.vae.config.resolution
    if image.size != (size, size):
        raise UsageError(
            f"--input {path} is {image.size[0]}x{image.size[1]} pixels, but this model works on "
            f"{size}x{size} images (resize it, or use a model trained at that size)"
        )


def input_class(pipe, image: Image.Image, class_name: str | None) -> tuple[int, bool]:
    """(label, inferred?): the given class (by the model's names), else the one under which the VAE finds
    the image most likely."""
    from bloodgen_hf.sampling import pipeline_class_names

    if class_name is not None:
        return class_index(class_name, pipeline_class_names(pipe)), False
    return int(pipe.classify(image)[0]), True


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def reconstruct_file(
    path: Path, out: Path, model: str, device: str, class_name: str | None = None
) -> tuple[str, bool, float]:
    """Write the reconstruction of one image as a PNG; returns (class name, inferred?, PSNR in dB)."""
    image = read_image(path)
    pipe = load_vae(model, device)
    check_size(image, path, pipe)
    label, inferred = input_class(pipe, image, class_name)
    recon = pipe.reconstruct(image, class_labels=label).images[0]
    save_image(recon, out)
    return class_name_of(pipe, label), inferred, psnr(image, recon)


def class_name_of(pipe, label: int) -> str:
    from bloodgen_hf.sampling import pipeline_class_names

    return pipeline_class_names(pipe)[label]


def variations_folder(
    path: Path,
    out: Path,
    model: str,
    device: str,
    n: int,
    temperature: float,
    seed: int = 0,
    class_name: str | None = None,
) -> tuple[str, bool]:
    """<out>/variation_000.png ... and info.json, written to a temporary folder renamed into place;
    returns (class name, inferred?).

    Variation i uses its own generator seeded seed+i, so it can be redrawn alone.
    """
    if isinstance(n, bool) or n < 1:
        raise UsageError(f"--n must be a positive number of variations, got {n}")
    if not temperature >= 0:
        raise UsageError(f"--temperature must be >= 0, got {temperature}")
    image = read_image(path)
    pipe = load_vae(model, device)
    check_size(image, path, pipe)
    label, inferred = input_class(pipe, image, class_name)
    generators = [torch.Generator(pipe.device).manual_seed(seed + i) for i in range(n)]
    images = pipe.variations(image, n, class_label=label, temperature=temperature, generator=generators).images
    info = {
        "input": str(path),
        "model": model,
        "class": class_name_of(pipe, label),
        "class_inferred": inferred,
        "temperature": temperature,
        "seed": seed,
        "n": n,
    }
    with atomic_path(out, is_dir=True) as tmp:
        for i, variation in enumerate(images):
            variation.save(tmp / f"variation_{i:03d}.png", format="PNG")
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info["class"], inferred
