"""BloodDDPMPipeline: class-conditional blood-cell images from a UNet2DModel, with classifier-free guidance."""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from .blood_pipeline_utils import BloodPipelineMixin, UsageError, postprocess, resolve_class_labels

# name -> (scheduler class, settings that differ from the class defaults); any of them can sample
# a UNet trained with DDPMScheduler, because they all read the same betas and prediction type.
SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
}


# The same names for a UNet trained by flow matching (it predicts the velocity noise - image).
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 1.0}
FLOW_SCHEDULERS = {
    "euler": (FlowMatchEulerDiscreteScheduler, {"shift": 1.0}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, **FLOW}),
    "unipc": (UniPCMultistepScheduler, FLOW),
}


def is_flow(config) -> bool:
    """Whether a scheduler config belongs to a flow-matching model: a solver with flow sigmas, or
    FlowMatchEuler's own config (a live scheduler's config has no _class_name; it is the one without betas)."""
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler" or config.get("use_flow_sigmas"):
        return True
    return "shift" in config and "beta_start" not in config


def flow_shift_setting(cls: type, shift: float) -> dict:
    """The time shift as `cls` takes it: FlowMatchEuler names it `shift`, the flow solvers `flow_shift`."""
    return {("shift" if cls is FlowMatchEulerDiscreteScheduler else "flow_shift"): shift}


def make_scheduler(name: str, config) -> object:
    """A scheduler named as in SCHEDULERS, with the noise schedule of `config` (any scheduler's config);
    a flow-matching config gets the flow version of the named solver (FLOW_SCHEDULERS)."""
    key = str(name).strip().lower()
    table = FLOW_SCHEDULERS if is_flow(config) else SCHEDULERS
    if key not in table:
        kind = " (the flow-matching ones)" if table is FLOW_SCHEDULERS else ""
        raise UsageError(f"unknown scheduler {name!r}; choose from: {', '.join(table)}{kind}")
    cls, settings = table[key]
    if table is FLOW_SCHEDULERS:  # the length and the time shift carry over, under each class's own name for it
        shift = config.get("flow_shift", config.get("shift", 1.0))
        settings = {**settings, **flow_shift_setting(cls, shift)}
        return cls(num_train_timesteps=config["num_train_timesteps"], **settings)
    return cls.from_config(config, **settings)


def check_class_conditional(unet: UNet2DModel) -> int:
    """The number of real classes; the UNet must look labels up in an embedding table with one extra
    "null" row (diffusers ignores class labels altogether in a UNet built without class embeddings)."""
    n = unet.config.num_class_embeds
    if unet.config.class_embed_type is not None or n is None or n < 2 or unet.class_embedding is None:
        raise UsageError(
            "BloodDDPMPipeline needs a UNet2DModel built with num_class_embeds = classes + 1 (the last is the "
            f"null class of classifier-free guidance) and class_embed_type None; got num_class_embeds={n!r}, "
            f"class_embed_type={unet.config.class_embed_type!r}"
        )
    return n - 1


class BloodDDPMPipeline(BloodPipelineMixin, DiffusionPipeline):
    """Denoise Gaussian noise into images of the asked classes.

    Guidance: eps = eps(null) + guidance_scale * (eps(class) - eps(null)). guidance_scale 1 is the
    plain conditional model and 0 the unconditional one, each needing one UNet pass per step; any
    other value runs both in one doubled batch. `guidance_interval` (lo, hi) guides only the steps whose
    noise level t / num_train_timesteps lies in (lo, hi] and runs the conditional model alone at the others
    (Kynkaanniemi et al. 2024: guidance at the noisiest steps narrows the samples; for a flow-matching model the
    level is the noise share sigma of x_t = (1 - sigma) x + sigma z). None guides every step.
    `num_inference_steps` None means every training step for DDPMScheduler and `default_num_inference_steps` for
    the fast solvers.

    `class_labels`: a list of labels (class indices or names) gives one image per label, as in diffusers'
    DiTPipeline; one label or None gives `num_images` (default 8) of it or of the classes in turn.
    `generator` may be one torch.Generator or a list with one per image (then every image is
    reproducible on its own, whatever the batch it was drawn in). `with_scheduler("dpm++")` gives a
    copy sampling with another scheduler (see SCHEDULERS). `output_type` is pil, np, pt or latent (the
    undecoded samples). `provenance` records the data it was trained on
    (see bloodgen_hf/provenance.py); saved in provenance.json (a summary in model_index.json).
    """

    model_cpu_offload_seq = "unet"
    # what it samples with when the caller passes nothing (see replaced(), and bloodgen_hf/set_defaults.py)
    SAMPLING_DEFAULTS = ("default_guidance_scale", "default_num_inference_steps", "default_guidance_interval")

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler,
        class_names: list[str] | None = None,
        default_guidance_scale: float = 1.0,
        default_num_inference_steps: int = 10,
        provenance: dict | None = None,
        default_guidance_interval: list[float] | None = None,
    ):
        super().__init__()
        num_classes = check_class_conditional(unet)
        if class_names is not None and len(class_names) != num_classes:
            raise UsageError(f"got {len(class_names)} class names for a UNet with {num_classes} classes")
        check_sampling_arguments(default_guidance_scale, default_num_inference_steps)
        interval = check_guidance_interval(default_guidance_interval)
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            class_names=list(class_names) if class_names else None,
            default_guidance_scale=float(default_guidance_scale),
            default_num_inference_steps=int(default_num_inference_steps),
            provenance=dict(provenance) if provenance else None,
        )
        if interval:  # recorded only when set: the models saved before it existed keep their config and hash
            self.register_to_config(default_guidance_interval=list(interval))

    @property
    def class_names(self) -> list[str] | None:
        names = self.config.class_names
        return list(names) if names else None

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def resolution(self) -> int:
        """The side in pixels of the images it makes, known without sampling: the UNet's sample_size (a subclass
        that decodes latents scales it, see BloodLDMPipeline)."""
        return square_side(self.unet.config.sample_size)

    def with_scheduler(self, name: str) -> BloodDDPMPipeline:
        """A copy sampling with scheduler `name` (ddpm, ddim, dpm++, unipc, euler)."""
        return self.replaced(scheduler=make_scheduler(name, self.scheduler.config))

    def replaced(self, scheduler=None, **defaults) -> BloodDDPMPipeline:
        """A copy sharing the models (the UNet, and a subclass's own, such as BloodLDMPipeline's autoencoder), with
        another scheduler and/or sampling defaults (default_guidance_scale, default_num_inference_steps,
        default_guidance_interval), checked as a new pipeline's are; the rest kept."""
        kept = {key: self.config.get(key) for key in self.SAMPLING_DEFAULTS}
        unknown = set(defaults) - set(kept)
        if unknown:
            raise TypeError(f"replaced() takes the sampling defaults {self.SAMPLING_DEFAULTS}, not {sorted(unknown)}")
        pipe = type(self)(
            **{**self.components, "scheduler": scheduler or self.scheduler},
            class_names=self.class_names,
            provenance=self.config.get("provenance"),
            **{**kept, **defaults},
        )
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def default_steps(self) -> int:
        if isinstance(self.scheduler, DDPMScheduler):
            return self.scheduler.config.num_train_timesteps
        return self.config.default_num_inference_steps

    @torch.no_grad()
    def __call__(
        self,
        num_images: int | None = None,
        class_labels=None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_interval: tuple[float, float] | None = None,
    ):
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        interval = self.config.get("default_guidance_interval") if guidance_interval is None else guidance_interval
        interval = check_guidance_interval(interval)
        steps = self.default_steps() if num_inference_steps is None else num_inference_steps
        check_sampling_arguments(guidance_scale, steps, self.scheduler.config.num_train_timesteps)
        labels = resolve_class_labels(class_labels, num_images, self.class_names, self.num_classes)
        num_images = len(labels)
        if isinstance(generator, list) and len(generator) != num_images:
            raise UsageError(f"got {len(generator)} generators for {num_images} images")

        param = next(self.unet.parameters())
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        shape = (num_images, self.unet.config.in_channels, height, width)
        x = randn_tensor(shape, generator=generator, device=param.device, dtype=param.dtype)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        labels = labels.to(param.device)
        self.scheduler.set_timesteps(steps, device=param.device)
        # Stochastic schedulers (DDPM) draw their step noise from the same per-image generators.
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )
        self.unet.eval()
        levels = self.scheduler.config.num_train_timesteps
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x
            guided = in_guidance_interval(float(t) / levels, interval)
            prediction = self.guided_prediction(model_input, t, labels, guidance_scale if guided else 1.0)
            x = self.scheduler.step(prediction, t, x, **step_kwargs).prev_sample
        # "latent": the denoised samples as they are (a latent model's latents, undecoded), as diffusers' pipelines do
        images = x if output_type == "latent" else postprocess(self.decode(x), output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """The denoised samples as [-1, 1] images: here they are the images; BloodLDMPipeline decodes latents."""
        return samples

    def guided_prediction(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """The UNet's output mixed by classifier-free guidance (one or two passes, see the class doc), in x's
        dtype: under torch.autocast the UNet answers in bf16, and the guidance mix and the scheduler's update
        stay in fp32."""
        if guidance_scale == 1:
            return self.unet(x, t, class_labels=labels).sample.to(x.dtype)
        null = torch.full_like(labels, self.null_class)
        if guidance_scale == 0:
            return self.unet(x, t, class_labels=null).sample.to(x.dtype)
        t = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t  # one timestep per image (distillation)
        both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.to(x.dtype)
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)


def square_side(size: int | tuple[int, int] | list[int]) -> int:
    """The side of a square sample_size (an int, or equal height and width); images here are square, so a
    UNet configured for another shape is refused rather than given a side it does not have."""
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise UsageError(f"the UNet's sample_size {list(size)} is not square; bloodgen pipelines make square images")
    return int(height)


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """None, or (lo, hi) noise levels with 0 <= lo < hi <= 1 (see BloodDDPMPipeline's doc)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise UsageError(
            f"guidance_interval (--guidance-interval) must be two numbers lo,hi; got {interval!r}"
        ) from None
    if not (0 <= lo < hi <= 1):
        raise UsageError(f"guidance_interval (--guidance-interval) needs 0 <= lo < hi <= 1, got {lo:g},{hi:g}")
    return lo, hi


def in_guidance_interval(level, interval: tuple[float, float] | None):
    """Whether noise level t/T (a float, or a tensor of them) is guided: all are without an interval; else
    lo < t/T <= hi, so that (0, hi] guides every level up to hi and the noisiest stay unguided."""
    if interval is None:
        return torch.ones_like(level, dtype=torch.bool) if isinstance(level, torch.Tensor) else True
    lo, hi = interval
    return (lo < level) & (level <= hi)


def check_sampling_arguments(guidance_scale: float, steps: int, max_steps: int | None = None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"num_inference_steps (--steps) must be a positive integer, got {steps!r}")
    if max_steps is not None and steps > max_steps:
        raise UsageError(f"num_inference_steps (--steps) {steps} exceeds the {max_steps} training timesteps")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise UsageError(f"guidance_scale (--guidance) must be a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise UsageError(f"guidance_scale (--guidance) must be >= 0 (1 = no guidance), got {guidance_scale}")
