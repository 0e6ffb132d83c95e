"""`bloodgen-hf`: sample, train and inspect BloodMNIST generative models from the shell.

Every command turns bad input into one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from enum import Enum
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])

DEFAULT_MODEL = "gan"


class Distribution(str, Enum):
    balanced = "balanced"
    real = "real"


class OutputFormat(str, Enum):
    png = "png"
    npz = "npz"


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def clean_errors(command):
    """Show expected failures (bad input, missing files, corrupt weights) as one line, exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from bloodgen_hf.data import DataError
        from bloodgen_hf.hub import ModelLoadError

        try:
            return command(*args, **kwargs)
        except (ValueError, FileExistsError, FileNotFoundError, ModelLoadError, DataError) as err:
            fail(str(err))

    return wrapper


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible")
    return device


@app.command()
@clean_errors
def sample(
    n: int = typer.Option(..., "--n", help="How many images to generate."),
    model: str = typer.Option(
        DEFAULT_MODEL, help="A bundled model name (see `bloodgen-hf models`) or a pipeline folder."
    ),
    classes: list[str] = typer.Option(None, "--class", help="Only these classes (name or index); repeatable."),
    balanced: bool = typer.Option(False, "--balanced", help="Equal counts per class (the default)."),
    real_distribution: bool = typer.Option(
        False, "--real-distribution", help="Class counts in BloodMNIST's proportions."
    ),
    seed: int = typer.Option(0, help="Image i uses seed+i, recorded in the manifest."),
    batch_size: int = typer.Option(250, help="Images per forward pass."),
    out: Path = typer.Option(None, help="Output folder (png) or file (npz). Default: samples / samples.npz."),
    output_format: OutputFormat = typer.Option(
        OutputFormat.png, "--format", help="png: one folder per class + manifest.csv; npz: one archive."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    temperature: float = typer.Option(None, help="VAE: scale of the prior noise (1 = the prior)."),
    latent_bias: float = typer.Option(None, help="VAE: shift added to the prior noise."),
    steps: int = typer.Option(None, help="DDPM: number of denoising steps."),
    guidance: float = typer.Option(None, help="DDPM: classifier-free guidance scale."),
    scheduler: str = typer.Option(None, help="DDPM: ddpm, ddim, dpm++, unipc or euler."),
):
    """Generate N class-conditional images with a bundled or saved model."""
    from bloodgen_hf.data import class_index
    from bloodgen_hf.hub import load_pipeline
    from bloodgen_hf.sampling import (
        check_output,
        configure_sampling,
        generate,
        plan_labels,
        write_npz,
        write_png_folder,
    )

    if balanced and real_distribution:
        raise ValueError("choose one of --balanced and --real-distribution")
    out = out or Path("samples.npz" if output_format is OutputFormat.npz else "samples")
    labels = plan_labels(n, [class_index(c) for c in classes or []], "real" if real_distribution else "balanced")
    check_output(out, overwrite)
    pipe = load_pipeline(model, pick_device(device))
    options = {
        "temperature": temperature,
        "latent_bias": latent_bias,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "scheduler": scheduler,
    }
    pipe, kwargs = configure_sampling(pipe, {k: v for k, v in options.items() if v is not None})
    info = {"model": model, "seed": seed, "distribution": "real" if real_distribution else "balanced", "n": n, **kwargs}
    started = time.time()
    batches = generate(pipe, labels, seed=seed, batch_size=batch_size, **kwargs)
    writer = write_npz if output_format is OutputFormat.npz else write_png_folder
    writer(batches, out, info)
    elapsed = time.time() - started
    typer.echo(f"wrote {n} images to {out} in {elapsed:.1f} s ({n / elapsed:.0f} images/s)")


@app.command()
def models():
    """List the bundled models."""
    from bloodgen_hf.hub import bundled_models, read_model_index

    for name, folder in bundled_models().items():
        index = read_model_index(folder)
        marker = " (default)" if name == DEFAULT_MODEL else ""
        typer.echo(f"{name}{marker}\t{index['_class_name'][-1]}\t{folder}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    family: str = typer.Argument(..., help="gan"),
):
    """Train a model family in this process: `bloodgen-hf train gan --data-dir ../shared/data --epochs 15`.

    The remaining options go to the train script (`--help` lists them). For several processes use
    `accelerate launch train_scripts/train_<family>.py` instead.
    """
    from bloodgen_hf.training import TRAIN_ENTRY_POINTS

    if family not in TRAIN_ENTRY_POINTS:
        fail(f"unknown model family {family!r}; choose from: {', '.join(TRAIN_ENTRY_POINTS)}")
    TRAIN_ENTRY_POINTS[family](list(ctx.args))


@app.command()
@clean_errors
def info(model: str = typer.Argument(DEFAULT_MODEL, help="A bundled model name or a pipeline folder.")):
    """Show a model's pipeline class, components and parameter counts."""
    from bloodgen_hf.hub import load_pipeline, resolve_model

    pipe = load_pipeline(model)
    report = {"model": model, "folder": str(resolve_model(model)), "pipeline": type(pipe).__name__, "components": {}}
    for name, component in pipe.components.items():
        entry = {"class": type(component).__name__}
        if hasattr(component, "parameters"):
            entry["parameters"] = sum(p.numel() for p in component.parameters())
        if hasattr(component, "config"):
            entry["config"] = {k: v for k, v in dict(component.config).items() if not k.startswith("_")}
        report["components"][name] = entry
    json.dump(report, sys.stdout, indent=2, default=str)
    typer.echo()


if __name__ == "__main__":
    app()
