"""`bloodgen-hf`: sample, train and inspect BloodMNIST generative models from the shell.

Every command turns bad input or usage into one `error: ...` line on stderr and exit code 2, and a
failure while working (a full disk) into one line and exit code 1. Any other error is a bug: one line
that says so, exit code 1; `--debug` or BLOODGEN_DEBUG=1 prints its traceback (bloodgen_hf/errors.py).
A command that writes an output holds that output's lock until it ends, so a second writer is refused
(exit 2) instead of mixing in.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperCommand

from bloodgen_hf.errors import UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.callback()
def start_process(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="On an error, print its traceback (as BLOODGEN_DEBUG=1 does)."),
) -> None:
    """Runs before every command: faster memory reuse for the whole process, and SIGTERM stops the command
    as Ctrl-C does, cleaning up, then exits 143 (bloodgen_hf/process.py). --debug lasts for this command."""
    from bloodgen_hf.errors import set_debug
    from bloodgen_hf.process import sigterm_exits, tune_malloc

    set_debug(debug)
    ctx.call_on_close(lambda: set_debug(False))  # tests run many commands in one process
    tune_malloc()
    ctx.with_resource(sigterm_exits())


DEFAULT_MODEL = "ddpm-fast"  # choose_default(experiments/reports/compare): quality first, then speed (a test checks it)
DEFAULT_VAE_MODEL = "vae"


class Distribution(str, Enum):
    balanced = "balanced"
    real = "real"


class OutputFormat(str, Enum):
    png = "png"
    npz = "npz"
    hf_dataset = "hf-dataset"


# Options that several commands share, declared once (defaults stay in each signature).
DataDir = Annotated[Path, typer.Option(help="Folder holding the MedMNIST archives (else $BLOODGEN_DATA_DIR).")]
Dataset = Annotated[
    str,
    typer.Option(
        help="Real images: bloodmnist, another MedMNIST 2D flag (pathmnist, ...), an ImageFolder (one subfolder per "
        "class), a `datasets` save_to_disk folder or a Hub dataset id."
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Overwrite = Annotated[bool, typer.Option(help="Replace or write into an existing output.")]
Temperature = Annotated[float, typer.Option(help="VAE: scale of the prior noise (1 = the prior).")]
LatentBias = Annotated[float, typer.Option(help="VAE: shift added to the prior noise.")]
Steps = Annotated[int, typer.Option(help="DDPM: number of denoising steps.")]
Guidance = Annotated[float, typer.Option(help="DDPM: classifier-free guidance scale.")]
Scheduler = Annotated[str, typer.Option(help="DDPM: ddpm, ddim, dpm++, unipc or euler.")]
GuidanceInterval = Annotated[
    str,
    typer.Option(
        metavar="LO,HI",
        help="DDPM/LDM: guide only the steps whose noise level t/T is in (LO, HI], e.g. 0.2,0.85; the conditional "
        "model alone at the others (default: the model's, else every step).",
    ),
]
Precision = Annotated[
    str,
    typer.Option(
        help="auto, fp32 or bf16 (autocast). auto: bf16 for DDPM models on a CPU with bf16 in hardware "
        "(AMX or AVX512-BF16, 2.6x faster there), else fp32."
    ),
]
Runs = Annotated[int, typer.Option(help="Independent runs; run r uses seed+r.")]
Count = Annotated[int, typer.Option("--n", help="Real and generated images per run.")]
Extractor = Annotated[
    str, typer.Option(help="inception: clean-fid FID (needs its weights); bloodnet: domain features, works offline.")
]
Metrics = Annotated[
    list[str],
    typer.Option(
        "--metrics",
        help="Repeatable or comma-separated: fd,kid,is,pr,dc,1nn,memorization,class-fd,accuracy (default: all).",
    ),
]
Balanced = Annotated[bool, typer.Option("--balanced", help="Generate equal counts per class, not the real mix.")]
Seed = Annotated[int, typer.Option(help="Seed of the first run.")]
Split = Annotated[str, typer.Option(help="Draw real images from this split (all: the whole dataset).")]
InceptionWeights = Annotated[Path, typer.Option(help="Local inception-2015-12-05.pt ($BLOODGEN_INCEPTION_WEIGHTS).")]
BloodNetFolder = Annotated[
    Path,
    typer.Option(help="BloodNet folder; default $BLOODGEN_BLOODNET, else the bundled one of the scored size (28, 64)."),
]
CacheDir = Annotated[Path, typer.Option(help="Real-feature cache; default ~/.cache/bloodgen_hf/features.")]
NoFloor = Annotated[bool, typer.Option("--no-floor", help="Skip the real-vs-real floor.")]
MemorizationN = Annotated[int, typer.Option(help="Generated images per run checked for near-copies (0: all).")]
GenerationBatch = Annotated[int, typer.Option(help="Images per generation batch.")]
NumWorkers = Annotated[int, typer.Option(help="Resize workers for Inception (clean-fid would use 12).")]
Html = Annotated[bool, typer.Option(help="Also write report.html next to report.md.")]
Resolution = Annotated[
    int,
    typer.Option(
        help="Score at this image size (real data, BloodNet and memorization at it). Default: the size the "
        "model(s) make; a BloodNet trained at another size is refused."
    ),
]
Upsample = Annotated[
    str,
    typer.Option(
        help="bicubic: upsample a model that makes smaller images to --resolution before scoring (labelled "
        "'name (28->64 bicubic)'); without it such a model is refused. Never downsamples."
    ),
]


# The running command's resources (output locks), released when it ends however it ends.
_command_scope: contextvars.ContextVar[contextlib.ExitStack] = contextvars.ContextVar("command_scope")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def clean_errors(command):
    """End a command on an error with one line (bloodgen_hf/errors.py): a refusal (bad input or usage, missing
    files, corrupt weights, an output that exists or is being written) exits 2, a failure while working (disk
    full) exits 1, and anything else, a bug, exits 1 with a pointer to --debug. Ctrl-C, SIGTERM and typer's own
    exits pass through."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from bloodgen_hf.data import DataError
        from bloodgen_hf.errors import BAD_INPUT_OS_ERRORS, explain
        from bloodgen_hf.guard import OutputLockedError
        from bloodgen_hf.provenance import LeakError
        from bloodgen_hf.publish import HubError
        from bloodgen_hf.registry import ModelLoadError

        try:
            with contextlib.ExitStack() as scope:
                token = _command_scope.set(scope)
                try:
                    return command(*args, **kwargs)
                finally:
                    _command_scope.reset(token)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # typer.Exit (from `fail`) is a RuntimeError: not a bug
        except Exception as err:
            refusals = (ModelLoadError, DataError, HubError, OutputLockedError, LeakError, *BAD_INPUT_OS_ERRORS)
            code, message = explain(err, refusals)
            fail(message, code)

    return wrapper


def claim_output(out: Path, may_exist: bool) -> Path:
    """Check that `out` may be written, then hold its lock until the command ends and check again
    (another writer may have finished just before we got the lock)."""
    from bloodgen_hf.guard import output_lock
    from bloodgen_hf.sampling import check_output

    check_output(out, may_exist)
    _command_scope.get().enter_context(output_lock(out))
    check_output(out, may_exist)
    return out


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device {device!r}: {str(err).splitlines()[0]}; use auto, cpu or cuda") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is visible")
    return device


def parse_guidance_interval(text: str | None) -> tuple[float, float] | None:
    """--guidance-interval LO,HI as two numbers (the pipeline checks 0 <= LO < HI <= 1)."""
    if text is None:
        return None
    parts = str(text).split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--guidance-interval takes two numbers LO,HI such as 0.2,0.85, got {text!r}") from None
    return lo, hi


def sampling_options(
    temperature, latent_bias, steps, guidance, scheduler, precision="auto", guidance_interval=None
) -> dict:
    """The model-specific sampling flags the user set, named as the pipelines' arguments."""
    options = {
        "temperature": temperature,
        "latent_bias": latent_bias,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "guidance_interval": parse_guidance_interval(guidance_interval),
        "scheduler": scheduler,
        "precision": precision,
    }
    return {k: v for k, v in options.items() if v is not None}


@app.command()
@clean_errors
def sample(
    n: int = typer.Option(..., "--n", help="How many images to generate."),
    model: str = typer.Option(
        DEFAULT_MODEL, help="A bundled model name (see `bloodgen-hf models`) or a pipeline folder."
    ),
    classes: list[str] = typer.Option(
        None, "--class", help="Only these classes (the model's class names or indices); repeatable."
    ),
    balanced: bool = typer.Option(False, "--balanced", help="Equal counts per class (the default)."),
    real_distribution: bool = typer.Option(
        False, "--real-distribution", help="Class counts in BloodMNIST's proportions (BloodMNIST models)."
    ),
    seed: int = typer.Option(0, help="Image i uses seed+i, recorded in the manifest."),
    batch_size: int = typer.Option(250, help="Images per forward pass."),
    out: Path = typer.Option(
        None, help="Output folder (png, hf-dataset) or file (npz). Default: samples, samples.npz, samples_hf."
    ),
    output_format: OutputFormat = typer.Option(
        OutputFormat.png,
        "--format",
        help="png: one folder per class + manifest.csv; npz: one archive; hf-dataset: a `datasets` folder.",
    ),
    push_to_hub: str = typer.Option(None, help="hf-dataset: also publish it as this Hub dataset repo (org/name)."),
    token: str = typer.Option(None, help="Hugging Face token for --push-to-hub; default $HF_TOKEN or the login."),
    private: bool = typer.Option(False, help="Create the --push-to-hub repo private."),
    overwrite: Overwrite = False,
    device: Device = "auto",
    temperature: Temperature = None,
    latent_bias: LatentBias = None,
    steps: Steps = None,
    guidance: Guidance = None,
    guidance_interval: GuidanceInterval = None,
    scheduler: Scheduler = None,
    precision: Precision = "auto",
):
    """Generate N class-conditional images with a bundled or saved model."""
    from bloodgen_hf.evaluation.protocol import pipeline_fingerprint
    from bloodgen_hf.publish import check_repo_id, push_dataset, resolve_token
    from bloodgen_hf.registry import load_pipeline
    from bloodgen_hf.sampling import (
        check_count,
        configure_sampling,
        generate,
        model_labels,
        write_hf_dataset,
        write_npz,
        write_png_folder,
    )

    if balanced and real_distribution:
        raise UsageError("choose one of --balanced and --real-distribution")
    if push_to_hub:  # fail before generating, not after
        if output_format is not OutputFormat.hf_dataset:
            raise UsageError("--push-to-hub needs --format hf-dataset")
        check_repo_id(push_to_hub)
        token = resolve_token(token)
    out = out or Path({"png": "samples", "npz": "samples.npz", "hf-dataset": "samples_hf"}[output_format.value])
    check_count(n)
    claim_output(out, overwrite)
    pipe = load_pipeline(model, pick_device(device))
    labels, class_names = model_labels(pipe, n, classes, "real" if real_distribution else "balanced")
    options = sampling_options(temperature, latent_bias, steps, guidance, scheduler, precision, guidance_interval)
    weights = pipeline_fingerprint(pipe)  # as saved, before the options change its scheduler
    pipe, kwargs = configure_sampling(pipe, options)
    info = {
        "model": model,
        "model_sha256": weights,
        "seed": seed,
        "distribution": "real" if real_distribution else "balanced",
        "n": n,
        **options,
        "precision": kwargs["precision"],  # as resolved on this machine
    }
    started = time.time()
    batches = generate(pipe, labels, seed=seed, batch_size=batch_size, **kwargs)
    writer = {"png": write_png_folder, "npz": write_npz, "hf-dataset": write_hf_dataset}[output_format.value]
    writer(batches, out, info, class_names, overwrite=overwrite)
    elapsed = time.time() - started
    typer.echo(f"wrote {n} images to {out} in {elapsed:.1f} s ({n / elapsed:.0f} images/s)")
    if push_to_hub:
        typer.echo(f"pushed {out} to {push_dataset(out, push_to_hub, private=private, token=token).url}")


@app.command()
@clean_errors
def push(
    model: str = typer.Option(..., help="A bundled model name or a saved pipeline folder."),
    repo_id: str = typer.Option(..., help="The Hub model repo to publish to, org/name (created if missing)."),
    private: bool = typer.Option(False, help="Create the repo private."),
    revision: str = typer.Option(None, help="Branch to commit to (created if missing); default main."),
    token: str = typer.Option(None, help="Hugging Face token; default $HF_TOKEN or the stored login."),
    device: str = typer.Option("auto", help="Where to draw the card's sample grid: auto, cpu or cuda."),
):
    """Publish a model to the Hugging Face Hub: weights, remote code, sample grid and a model card.

    The repo then loads without bloodgen-hf: DiffusionPipeline.from_pretrained(repo, trust_remote_code=True).
    """
    from bloodgen_hf.publish import push_to_hub

    result = push_to_hub(model, repo_id, private=private, revision=revision, token=token, device=pick_device(device))
    typer.echo(f"pushed {model} to {result.url} (weights and code at commit {result.commit})")


@app.command()
@clean_errors
def reconstruct(
    input_path: Path = typer.Option(..., "--input", help="An image file (PNG) at the model's resolution."),
    model: str = typer.Option(DEFAULT_VAE_MODEL, help="A bundled VAE name or a saved VAE pipeline folder."),
    out: Path = typer.Option(None, help="Output PNG. Default: <input name>_reconstruction.png."),
    class_name: str = typer.Option(None, "--class", help="The input's class (name or index); default: inferred."),
    overwrite: Overwrite = False,
    device: Device = "auto",
):
    """Encode an image with a VAE and decode its posterior mean."""
    from bloodgen_hf.img2img import reconstruct_file

    out = out or Path(f"{input_path.stem}_reconstruction.png")
    claim_output(out, overwrite)
    name, inferred, psnr = reconstruct_file(input_path, out, model, pick_device(device), class_name)
    how = "inferred" if inferred else "given"
    typer.echo(f"wrote {out}: reconstruction of {input_path} as {name} ({how}), PSNR {psnr:.1f} dB")


@app.command()
@clean_errors
def variations(
    input_path: Path = typer.Option(..., "--input", help="An image file (PNG) at the model's resolution."),
    n: int = typer.Option(8, "--n", help="How many variations."),
    temperature: float = typer.Option(1.0, help="Scale of the resampling around the posterior (0 = its mean)."),
    model: str = typer.Option(DEFAULT_VAE_MODEL, help="A bundled VAE name or a saved VAE pipeline folder."),
    out: Path = typer.Option(None, help="Output folder. Default: <input name>_variations."),
    class_name: str = typer.Option(None, "--class", help="The input's class (name or index); default: inferred."),
    seed: int = typer.Option(0, help="Variation i uses seed+i."),
    overwrite: Overwrite = False,
    device: Device = "auto",
):
    """Image-to-image: resample a VAE's posterior around an image, N times."""
    from bloodgen_hf.img2img import variations_folder

    out = out or Path(f"{input_path.stem}_variations")
    claim_output(out, overwrite)
    name, inferred = variations_folder(input_path, out, model, pick_device(device), n, temperature, seed, class_name)
    how = "inferred" if inferred else "given"
    typer.echo(f"wrote {n} variations of {input_path} ({name}, {how}) to {out}")


@app.command()
@clean_errors
def grid(
    model: str = typer.Option(DEFAULT_MODEL, help="A bundled model name or a pipeline folder; 'real' for real images."),
    per_class: int = typer.Option(10, help="Images per class (one row per class)."),
    seed: int = typer.Option(0, help="Image i uses seed+i."),
    scale: int = typer.Option(3, help="Nearest-neighbour enlargement."),
    out: Path = typer.Option(Path("grid.png"), help="Output PNG."),
    data_dir: Path = typer.Option(None, help="With --model real: folder holding the MedMNIST archives."),
    dataset: Dataset = "bloodmnist",
    size: int = typer.Option(28, help="With --model real: image size (centre-crop and resize)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
):
    """Save a picture with one labelled row per class, from a model or from the real data (--dataset)."""
    import numpy as np

    from bloodgen_hf.data import load_data
    from bloodgen_hf.io import atomic_path, labelled_class_grid
    from bloodgen_hf.registry import load_pipeline
    from bloodgen_hf.sampling import generate, pipeline_class_names

    if per_class < 1 or scale < 1:
        raise UsageError("--per-class and --scale must be at least 1")
    claim_output(out, overwrite)
    if model == "real":
        images, real_labels, names, _ = load_data(dataset, "all", size, data_dir)
        rng = np.random.default_rng(seed)
        members = [np.flatnonzero(real_labels == c) for c in range(len(names))]
        images = images[np.concatenate([rng.choice(m, per_class, replace=len(m) < per_class) for m in members])]
    else:
        pipe = load_pipeline(model, pick_device("auto"))
        names = pipeline_class_names(pipe)
        labels = np.repeat(np.arange(len(names)), per_class)
        images = np.concatenate([b[0] for b in generate(pipe, labels, seed=seed, progress=False)])
    picture = labelled_class_grid(images.reshape(len(names), per_class, *images.shape[1:]), list(names), scale)
    with atomic_path(out, overwrite=overwrite) as tmp:
        picture.save(tmp, format="PNG")
    typer.echo(f"wrote {out}")


@app.command("export-imagefolder")
@clean_errors
def export_imagefolder(
    out: Path = typer.Option(..., help="The ImageFolder to write: one subfolder of PNGs per class."),
    dataset: Dataset = "bloodmnist",
    split: str = typer.Option("train", help="all, train, val or test."),
    size: int = typer.Option(28, help="Image size (centre-crop and resize)."),
    data_dir: DataDir = None,
    overwrite: Overwrite = False,
):
    """Write a dataset's split as an ImageFolder, e.g. BloodMNIST at 64 px to try `--dataset FOLDER`."""
    from bloodgen_hf.data import load_data, write_image_folder
    from bloodgen_hf.io import atomic_path

    claim_output(out, overwrite)
    data = load_data(dataset, split, size, data_dir)
    with atomic_path(out, is_dir=True, overwrite=overwrite) as tmp:
        write_image_folder(data, tmp)
    typer.echo(f"wrote {len(data.labels)} images of {len(data.class_names)} classes to {out}")


@app.command("replace-decoder")
@clean_errors
def replace_decoder(
    model: str = typer.Argument(..., help="A latent pipeline (BloodLDMPipeline): bundled name, folder or Hub repo."),
    autoencoder: Path = typer.Argument(..., help="An AutoencoderKL folder tuned from its own with --freeze-encoder."),
    out: Path = typer.Option(..., help="The pipeline folder to write."),
    overwrite: Overwrite = False,
):
    """Give a latent pipeline a fine-tuned decoder for the same latents (its encoder is checked to be the same)."""
    from bloodgen_hf.training.replace_decoder import replace_decoder as write_with_decoder

    claim_output(out, overwrite)
    write_with_decoder(model, str(autoencoder), out, overwrite=overwrite)
    typer.echo(f"wrote {out}: {model} decoding with {autoencoder}")


@app.command("set-defaults")
@clean_errors
def set_defaults(
    model: str = typer.Argument(..., help="A diffusion pipeline (DDPM or LDM): bundled name, folder or Hub repo."),
    out: Path = typer.Option(..., help="The pipeline folder to write."),
    steps: Steps = None,
    guidance: Guidance = None,
    guidance_interval: GuidanceInterval = None,
    overwrite: Overwrite = False,
):
    """Save a copy of a model that samples with other defaults (the settings you chose on val): `sample`,
    `evaluate`, the Hub copy and `train student`'s teacher pairs then use them when none are passed."""
    from bloodgen_hf.set_defaults import save_with_defaults

    interval = parse_guidance_interval(guidance_interval)
    claim_output(out, overwrite)
    before = save_with_defaults(model, out, guidance, steps, interval, overwrite=overwrite)
    after = {"guidance": guidance, "steps": steps, "guidance interval": interval}
    was = dict(zip(("guidance", "steps", "guidance interval"), before.values(), strict=True))
    changes = ", ".join(f"{key} {was[key]} -> {value}" for key, value in after.items() if value is not None)
    typer.echo(f"wrote {out}: {model} with {changes}")


@app.command()
@clean_errors
def models():
    """List the bundled models, with the data each was trained on (so nobody scores one on data it saw)."""
    from bloodgen_hf.provenance import describe_provenance
    from bloodgen_hf.registry import bundled_models, read_model_index

    for name, folder in bundled_models().items():
        index = read_model_index(folder)
        marker = " (default)" if name == DEFAULT_MODEL else ""
        trained_on = describe_provenance(index.get("provenance"))
        typer.echo(f"{name}{marker}\t{index['_class_name'][-1]}\ttrained on {trained_on}\t{folder}")


class ScriptCommand(TyperCommand):
    """A command whose options after its first argument belong to a script: `train ldm --help` is then the train
    script's (argparse) help, while `train --help`, before any argument, stays typer's."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-"):
            ctx.help_option_names = []  # no help option: `--help` goes on to the script with the other options
        return super().parse_args(ctx, args)


@app.command(cls=ScriptCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@clean_errors
def train(
    ctx: typer.Context,
    family: str = typer.Argument(
        ...,
        help="gan, ddpm, vae, student (a few-step DDPM), autoencoder (64 px AutoencoderKL), ldm (latent flow "
        "model) or bloodnet",
    ),
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
    from bloodgen_hf.registry import load_pipeline, resolve_model

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


# --- evaluation -------------------------------------------------------------------------------------


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _default_out(out: Path | None, default: Path) -> Path:
    """An explicit --out is used as given; the default folder's parent is created."""
    if out is not None:
        return out
    default.parent.mkdir(parents=True, exist_ok=True)
    return default


def _protocol(runs, n, seed, balanced, metrics, no_floor, memorization_n, batch_size):
    from bloodgen_hf.evaluation.protocol import Protocol, parse_metrics

    return Protocol(
        runs=runs,
        n=n,
        seed=seed,
        distribution="balanced" if balanced else "real",
        metrics=parse_metrics(metrics),
        with_floor=not no_floor,
        memorization_n=memorization_n,
        batch_size=batch_size,
    )


def _evaluation_setup(out, default_out, may_write_into, device) -> tuple[Path, str]:
    """What evaluate and compare both do first, before anything is loaded: claim the output folder, pick the device."""
    return claim_output(_default_out(out, default_out), may_write_into), pick_device(device)


def _scored_at(pipes: dict, resolution: int | None, upsample: str | None) -> int:
    """The resolution the loaded models (by name) are scored at, which picks the bundled BloodNet; a model that
    cannot be scored at it is refused first, before an evaluator is loaded for a size that would not be used."""
    from bloodgen_hf.evaluation.runner import scoring_resolution, upsampling

    sizes = {model: pipe.resolution for model, pipe in pipes.items()}
    scored_at = scoring_resolution(sizes, resolution, upsample)
    for model, size in sizes.items():
        upsampling(model, size, scored_at, upsample)
    return scored_at


@app.command()
@clean_errors
def evaluate(
    model: str = typer.Option(DEFAULT_MODEL, help="A bundled model name or a pipeline folder."),
    runs: Runs = 5,
    n: Count = 10_000,
    extractor: Extractor = "inception",
    metrics: Metrics = None,
    balanced: Balanced = False,
    seed: Seed = 0,
    split: Split = "all",
    data_dir: DataDir = None,
    dataset: Dataset = "bloodmnist",
    out: Path = typer.Option(None, help="Results folder. Default: eval/<model>[-<resolution>px][-<upsample>]."),
    overwrite: bool = typer.Option(False, help="Replace an existing results folder."),
    resolution: Resolution = None,
    upsample: Upsample = None,
    record: bool = typer.Option(False, help="Also write eval_results.json into the model folder, for `push`."),
    inception_weights: InceptionWeights = None,
    bloodnet: BloodNetFolder = None,
    cache_dir: CacheDir = None,
    no_floor: NoFloor = False,
    memorization_n: MemorizationN = 2000,
    batch_size: GenerationBatch = 250,
    num_workers: NumWorkers = 0,
    device: Device = "auto",
    temperature: Temperature = None,
    latent_bias: LatentBias = None,
    steps: Steps = None,
    guidance: Guidance = None,
    guidance_interval: GuidanceInterval = None,
    scheduler: Scheduler = None,
    precision: Precision = "auto",
):
    """The standard protocol: --runs x (--n real vs --n generated images), every metric, mean ± std."""
    from bloodgen_hf.evaluation.report import metric_table, write_hub_results
    from bloodgen_hf.evaluation.runner import build_tools, check_scoring_options, evaluate_to_folder, model_label
    from bloodgen_hf.registry import load_pipeline, resolve_model
    from bloodgen_hf.sampling import configure_sampling

    protocol = _protocol(runs, n, seed, balanced, metrics, no_floor, memorization_n, batch_size)
    check_scoring_options(resolution, upsample)
    if upsample and resolution is None:
        raise UsageError("--upsample needs --resolution, the size to upsample the model's images to")
    if record and upsample:
        raise UsageError("--record puts the model's own scores in its card; an --upsample evaluation is a baseline")
    suffix = (f"-{resolution}px" if resolution else "") + (f"-{upsample}" if upsample else "")
    out, device = _evaluation_setup(out, Path("eval") / (model_label(model) + suffix), overwrite, device)
    options = sampling_options(temperature, latent_bias, steps, guidance, scheduler, precision, guidance_interval)
    pipe, kwargs = configure_sampling(load_pipeline(model, device), options)
    scored_at = _scored_at({model: pipe}, resolution, upsample)
    tools = build_tools(
        extractor, protocol.metrics, device, inception_weights, bloodnet, num_workers, resolution=scored_at
    )
    results = evaluate_to_folder(
        pipe,
        model,
        out,
        *tools,
        protocol,
        data_dir,
        split,
        cache_dir,
        kwargs,
        log=_log,
        dataset=dataset,
        resolution=resolution,
        upsample=upsample,
    )
    typer.echo("\n".join(metric_table(results)))
    typer.echo(f"wrote {out}/results.json, eval_results.json and summary.md")
    if record:
        typer.echo(f"wrote {write_hub_results(results, resolve_model(model))}")


@app.command(context_settings={"allow_extra_args": True})
@clean_errors
def compare(
    ctx: typer.Context,
    models: list[str] = typer.Option(..., "--models", help="Models to compare: --models gan vae ddpm."),
    runs: Runs = 5,
    n: Count = 10_000,
    extractor: Extractor = "inception",
    metrics: Metrics = None,
    balanced: Balanced = False,
    seed: Seed = 0,
    split: Split = "all",
    data_dir: DataDir = None,
    dataset: Dataset = "bloodmnist",
    out: Path = typer.Option(None, help="Report folder. Default: reports/compare."),
    overwrite: bool = typer.Option(False, help="Write into an existing report folder."),
    reuse: bool = typer.Option(False, help="Keep per-model results already in --out made with the same protocol."),
    tstr: int = typer.Option(
        0,
        help="TSTR: also train augment-study's classifier on N synthetic images of each model and on N real train "
        "images, both scored on the real test split (0: off). A model trained on the test split gets no score "
        "(the report says why); refused if no model qualifies.",
    ),
    tstr_steps: int = typer.Option(300, help="--tstr: optimizer steps of each classifier (augment-study's)."),
    resolution: Resolution = None,
    upsample: Upsample = None,
    html: Html = False,
    inception_weights: InceptionWeights = None,
    bloodnet: BloodNetFolder = None,
    cache_dir: CacheDir = None,
    no_floor: NoFloor = False,
    memorization_n: MemorizationN = 2000,
    batch_size: GenerationBatch = 250,
    num_workers: NumWorkers = 0,
    device: Device = "auto",
    precision: Precision = "auto",
):
    """Evaluate several models with one protocol; write a markdown report with table, charts and grids."""
    from functools import cache, partial

    from bloodgen_hf.evaluation.compare import compare as run_compare
    from bloodgen_hf.evaluation.runner import build_tools, check_scoring_options
    from bloodgen_hf.evaluation.tstr import TSTRConfig
    from bloodgen_hf.registry import load_pipeline

    names = [m for item in [*models, *ctx.args] for m in item.split(",") if m]
    protocol = _protocol(runs, n, seed, balanced, metrics, no_floor, memorization_n, batch_size)
    check_scoring_options(resolution, upsample)
    tstr_config = TSTRConfig(n=tstr, seed=seed, steps=tstr_steps) if tstr else None
    if tstr_config is not None:
        tstr_config.check()
    out, device = _evaluation_setup(out, Path("reports") / "compare", overwrite or reuse, device)
    load = cache(partial(load_pipeline, device=device))  # each model once: here for its size, then by run_compare
    scored_at = _scored_at({name: load(name) for name in names}, resolution, upsample)
    tools = build_tools(
        extractor, protocol.metrics, device, inception_weights, bloodnet, num_workers, resolution=scored_at
    )
    report = run_compare(
        names,
        out,
        *tools,
        protocol,
        load_pipeline=load,
        data_dir=data_dir,
        dataset=dataset,
        split=split,
        cache_dir=cache_dir,
        sampling_kwargs={"precision": precision},
        reuse=reuse,
        html=html,
        log=_log,
        tstr=tstr_config,
        resolution=resolution,
        upsample=upsample,
    )
    typer.echo(f"wrote {report}")


def _numbers(text: str, kind, flag: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} wants comma-separated numbers, got {text!r}") from None


@app.command("augment-study")
@clean_errors
def augment_study(
    model: str = typer.Option(
        None,
        help=f"The generator of the synthetic images (default {DEFAULT_MODEL}); refused unless its recorded training "
        "data leaves out the test split the classifiers are scored on.",
    ),
    generator_per_fraction: str = typer.Option(
        None,
        help="gan, ddpm or vae: instead of --model, train a generator of this family on exactly each seed's and "
        "fraction's real subset R_f (the classifier's), through its train script.",
    ),
    generator_steps: int = typer.Option(None, help="--generator-per-fraction: optimizer steps of each generator."),
    generator_options: str = typer.Option(
        "",
        help="--generator-per-fraction: more train-script options, e.g. "
        "'--diffaugment color,translation,cutout --batch-size 32'.",
    ),
    generator_resolution: int = typer.Option(
        None, help="--generator-per-fraction: image size of the generators (default --resolution, else 28)."
    ),
    resolution: int = typer.Option(
        None,
        help="Image size of the study (real data, classifiers, synthetic images); the generator must make images "
        "of this size, or it is refused. Default: the generator's size.",
    ),
    fractions: str = typer.Option("0.01,0.1,0.5,1", help="Fractions of the real train split."),
    seeds: str = typer.Option("0,1,2", help="Seeds (real subsets, classifier initialisation)."),
    settings: str = typer.Option("real,real+synthetic,synthetic", help="Training sets to compare."),
    synthetic_ratio: float = typer.Option(
        1.0, help="Recipe: synthetic images per real image, per class (0.5, 1, 2, 4...)."
    ),
    balance: bool = typer.Option(
        False, help="Recipe: top every class up with synthetic images to the largest class (synthetic: equal)."
    ),
    filter_threshold: float = typer.Option(
        0.0,
        help="Recipe: keep only synthetic images that the real-only classifier of the same seed and fraction "
        "(trained on R_f alone) gives at least this probability of their class; 0 = no filter.",
    ),
    synthetic_weight: float = typer.Option(
        1.0, help="Recipe: the loss weight of each synthetic image in real+synthetic (a real image's is 1)."
    ),
    finetune_epochs: int = typer.Option(
        0,
        help="Recipe: then this many more epochs on the real images alone, from the val-chosen weights at a tenth of "
        "the learning rate (synthetic pre-training, real fine-tuning); every setting, real only too (its control).",
    ),
    protocol: str = typer.Option(
        "converged",
        help="converged: --epochs over the real images, the epoch chosen on the val split; fixed-steps: the earlier "
        "protocol, --steps for every classifier.",
    ),
    classifier: str = typer.Option(
        None, help="bloodnet, bloodnet-small or resnet18 (MedMNIST's). Default: bloodnet (fixed-steps: bloodnet-small)."
    ),
    epochs: int = typer.Option(None, help="converged: epochs over the real images (default 20)."),
    min_steps: int = typer.Option(
        1000, help="converged: more epochs where the real images alone would get fewer optimizer steps."
    ),
    steps: int = typer.Option(None, help="fixed-steps: optimizer steps per classifier (default 300)."),
    batch_size: int = typer.Option(128, help="Classifier batch size (converged: the largest) and generation batch."),
    guidance: float = typer.Option(
        None, help="Sampling for the synthetic images: classifier-free guidance scale (default: the model's)."
    ),
    sample_steps: int = typer.Option(
        None, help="Sampling for the synthetic images: denoising steps (default: the model's)."
    ),
    precision: Precision = "auto",
    data_dir: DataDir = None,
    dataset: Dataset = "bloodmnist",
    out: Path = typer.Option(None, help="Study folder. Default: reports/augment-<model>."),
    overwrite: Overwrite = False,
    resume: bool = typer.Option(False, help="Continue a stopped study in --out: keep its pool and finished runs."),
    report_only: bool = typer.Option(
        False, help="Train nothing: write the report of the runs in --out finished so far (same options)."
    ),
    html: Html = False,
    device: Device = "auto",
):
    """Train classifiers on real, real+synthetic and synthetic data at several real-data sizes."""
    from bloodgen_hf.evaluation.augment_study import StudyConfig, run_study
    from bloodgen_hf.evaluation.runner import model_label
    from bloodgen_hf.registry import load_pipeline

    config = StudyConfig(
        fractions=_numbers(fractions, float, "--fractions"),
        seeds=_numbers(seeds, int, "--seeds"),
        settings=tuple(s.strip() for s in settings.split(",") if s.strip()),
        synthetic_ratio=synthetic_ratio,
        balance=balance,
        filter_threshold=filter_threshold,
        synthetic_weight=synthetic_weight,
        finetune_epochs=finetune_epochs,
        protocol=protocol,
        min_steps=min_steps,
        classifier=classifier or ("bloodnet-small" if protocol == "fixed-steps" else "bloodnet"),
        batch_size=batch_size,
        **_protocol_budget(protocol, epochs, steps),
    )
    config.check()
    plan = _generator_plan(
        model,
        generator_per_fraction,
        generator_steps,
        generator_options,
        _study_resolution(resolution, generator_resolution),
    )
    label = f"per-fraction-{plan.family}" if plan else model_label(model or DEFAULT_MODEL)
    out = _default_out(out, Path("reports") / f"augment-{label}")
    if report_only:  # the study may still be running (and holding --out): read, don't claim
        from bloodgen_hf.sampling import check_output

        check_output(out, overwrite=True)
    else:
        claim_output(out, overwrite or resume)
    device = pick_device(device)
    pipe = None if plan else load_pipeline(model or DEFAULT_MODEL, device)
    run_study(
        pipe,
        out,
        config,
        data_dir,
        sampling_kwargs=sampling_options(None, None, sample_steps, guidance, None, precision),
        log=_log,
        model=label,
        resume=resume,
        html=html,
        dataset=dataset,
        generator=plan,
        device=device,
        report_only=report_only,
        resolution=resolution,
    )
    typer.echo(f"wrote {out}/report.md")


@app.command()
@clean_errors
def augment(
    dataset: Dataset = "bloodmnist",
    split: str = typer.Option("train", help="The split to augment (a MedMNIST split, or 'all' for a folder)."),
    data_dir: DataDir = None,
    model: str = typer.Option(DEFAULT_MODEL, help="The generator: a bundled model name or a pipeline folder."),
    synthetic_ratio: float = typer.Option(
        2.0,
        help="Synthetic images per real image, per class. 2 is the best measured recipe at 10% of BloodMNIST; 4 "
        "helps more with ~15 real images per class (docs/augmentation.md).",
    ),
    balance: bool = typer.Option(False, help="Instead: top every class up with synthetic images to the largest one."),
    out: Path = typer.Option(Path("augmented"), help="Output folder."),
    output_format: str = typer.Option("png", "--format", help="png: ImageFolder + manifest.csv; hf-dataset."),
    seed: int = typer.Option(0, help="Synthetic image i uses seed+i, recorded in the manifest."),
    batch_size: int = typer.Option(250, help="Images per forward pass."),
    overwrite: Overwrite = False,
    device: Device = "auto",
    steps: Steps = None,
    guidance: Guidance = None,
    precision: Precision = "auto",
):
    """Write a labelled training set plus synthetic images, each marked real or synthetic."""
    from bloodgen_hf.augment import Recipe, augment
    from bloodgen_hf.data import describe_classes, load_data, same_classes
    from bloodgen_hf.evaluation.protocol import pipeline_fingerprint
    from bloodgen_hf.registry import load_pipeline
    from bloodgen_hf.sampling import configure_sampling, pipeline_class_names

    recipe = Recipe(synthetic_ratio, balance)
    recipe.check()
    claim_output(out, overwrite)
    pipe = load_pipeline(model, pick_device(device))
    real = load_data(dataset, split, pipe.resolution, data_dir)  # read at the model's size
    names = pipeline_class_names(pipe)
    if not same_classes(names, real.class_names):
        raise UsageError(
            f"{model} generates {describe_classes(names)}, but {dataset} has {describe_classes(real.class_names)}"
        )
    options = sampling_options(None, None, steps, guidance, None, precision)
    weights = pipeline_fingerprint(pipe)
    pipe, kwargs = configure_sampling(pipe, options)
    info = {"dataset": str(dataset), "split": split, "model": model, "model_sha256": weights, **options}
    counts = augment(
        pipe,
        real.images,
        real.labels,
        real.class_names,
        recipe,
        out,
        info,
        output_format,
        seed,
        batch_size,
        overwrite,
        **kwargs,
    )
    typer.echo(f"wrote {counts['real']} real + {counts['synthetic']} synthetic images ({recipe.name}) to {out}")


def _protocol_budget(protocol: str, epochs: int | None, steps: int | None) -> dict:
    """--epochs belongs to the converged protocol and --steps to fixed-steps; the other is refused."""
    if protocol == "fixed-steps" and epochs is not None:
        raise UsageError("--epochs is the converged protocol's budget; fixed-steps takes --steps")
    if protocol == "converged" and steps is not None:
        raise UsageError("--steps is the fixed-steps protocol's budget; the converged protocol takes --epochs")
    return {k: v for k, v in (("epochs", epochs), ("steps", steps)) if v is not None}


def _study_resolution(resolution: int | None, generator_resolution: int | None) -> int:
    """The per-fraction generators' size: --generator-resolution, else --resolution, else 28 (they must agree)."""
    from bloodgen_hf.evaluation.runner import check_resolution_option

    for value in (resolution, generator_resolution):
        check_resolution_option(value)
    if None not in (resolution, generator_resolution) and resolution != generator_resolution:
        raise UsageError(
            f"--generator-resolution {generator_resolution} differs from --resolution {resolution}: the generators "
            "must make images of the study's size"
        )
    return generator_resolution or resolution or 28


def _generator_plan(model: str | None, family: str | None, steps: int | None, options: str, resolution: int):
    """--generator-per-fraction's GeneratorPlan (checked), or None for a study of --model."""
    from bloodgen_hf.evaluation.augment_study import GeneratorPlan

    if family is None:
        if steps is not None or options:
            raise UsageError("--generator-steps and --generator-options go with --generator-per-fraction")
        return None
    if model is not None:
        raise UsageError("pass --model or --generator-per-fraction, not both")
    if steps is None:
        raise UsageError("--generator-per-fraction needs --generator-steps (optimizer steps of each generator)")
    plan = GeneratorPlan(family=family, steps=steps, options=options, resolution=resolution)
    plan.check()
    return plan


if __name__ == "__main__":
    app()
