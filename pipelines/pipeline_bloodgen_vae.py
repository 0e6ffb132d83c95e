"""BloodVAEPipeline: class-conditional blood-cell images from a conditional VAE, and image-to-image
uses of its encoder (reconstructions, variations, interpolations)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .blood_pipeline_utils import BloodPipelineMixin, UsageError, postprocess, resolve_class_labels


def inference(method):
    """Run a pipeline method without gradients and with the VAE in eval mode (as loaded models are)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self.vae.eval()
        with torch.no_grad():
            return method(self, *args, **kwargs)

    return wrapper


class BloodVAEPipeline(BloodPipelineMixin, DiffusionPipeline):
    """Decode a prior draw z with the requested class: z = latent_bias + temperature * eps, eps ~ N(0, I), or,
    for a VAE that holds a fitted class-conditional mixture prior (`vae.config.prior_components` > 0),
    z = latent_bias + mean_k + temperature * L_k eps, component k of the class's mixture drawn by its weight.

    `temperature` scales the prior noise, the deviation from the (component) mean: 0 gives the decoded mean,
    < 1 trades variety for typical-looking cells; `latent_bias` shifts z; both are the reparameterization knobs of
    the blood-cell VAE literature. Images given to `encode`, `reconstruct`, `variations` or
    `interpolate` may be PIL images, uint8 [N,H,W,3] arrays or [-1, 1] float [N,3,H,W] tensors at
    the model's resolution. Their class is inferred (see `classify`) unless given. `class_labels` of a call:
    a list of labels (class indices or names) gives one image per label, as in diffusers' DiTPipeline; one
    label or None gives `num_images` (default 8) of it or of the classes in turn. `provenance` records
    the data it was trained on (see bloodgen_hf/provenance.py); saved in provenance.json (a summary in
    model_index.json).
    """

    model_cpu_offload_seq = "vae"
    remote_code_modules = {"vae": "bloodgen_vae_models"}  # bloodgen_hf/models/vae.py ships as this

    def __init__(self, vae, provenance: dict | None = None):
        super().__init__()
        self.register_modules(vae=vae)
        self.register_to_config(provenance=dict(provenance) if provenance else None)

    @property
    def class_names(self) -> list[str] | None:
        names = self.vae.config.get("class_names")
        return list(names) if names else None

    @property
    def num_classes(self) -> int:
        return self.vae.config.num_classes

    @property
    def resolution(self) -> int:
        """The side in pixels of the images it makes and encodes: the VAE's configured size, known without sampling."""
        return int(self.vae.config.resolution)

    def _labels(self, class_labels, num_images: int | None) -> torch.Tensor:
        labels = resolve_class_labels(class_labels, num_images, self.class_names, self.num_classes)
        return labels.to(self.vae.device)

    def noise(self, num_images: int, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """eps ~ N(0, I): [num_images, *vae.latent_shape], image i from generator i when given a list."""
        if isinstance(generator, list) and len(generator) != num_images:
            raise UsageError(f"got {len(generator)} generators for {num_images} images")
        param = next(self.vae.parameters())
        shape = (num_images, *self.vae.latent_shape)
        return randn_tensor(shape, generator=generator, device=param.device, dtype=param.dtype)

    def prior_latents(
        self,
        num_images: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
        temperature: float = 1.0,
        latent_bias: float | torch.Tensor = 0.0,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z from the prior: [num_images, *vae.latent_shape]. N(0, I): latent_bias + temperature * eps. A mixture
        prior (which needs `class_labels`): each image's generator draws eps, then the uniform that picks the
        component, so image i is the same whatever the batch."""
        if not temperature >= 0:
            raise UsageError(f"temperature must be >= 0, got {temperature}")
        eps = self.noise(num_images, generator)
        bias = torch.as_tensor(latent_bias, dtype=eps.dtype, device=eps.device)
        if not self.vae.config.prior_components:
            return bias + temperature * eps
        if class_labels is None:
            raise UsageError("this VAE's prior is a mixture per class: pass the class_labels to draw from")
        uniforms = uniform_draws(num_images, generator).to(eps.device)
        return bias + self.vae.prior_sample(class_labels.to(eps.device), eps, uniforms, temperature)

    @inference
    def __call__(
        self,
        num_images: int | None = None,
        class_labels=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        temperature: float = 1.0,
        latent_bias: float | torch.Tensor = 0.0,
    ):
        labels = self._labels(class_labels, num_images)
        z = self.prior_latents(len(labels), generator, temperature, latent_bias, labels)
        return self._output(self.vae.decode(z, labels).sample, output_type, return_dict)

    # --- image to image ----------------------------------------------------------------------

    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s), uint8 [N,H,W,3] / [H,W,3] array or [-1, 1] tensor -> [N,3,R,R] float on the model's device."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images])
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise UsageError(f"numpy images must be uint8 [N,H,W,3], got dtype {images.dtype}")
            images = torch.tensor(images[None] if images.ndim == 3 else images).permute(0, 3, 1, 2)
            images = images.float() / 127.5 - 1
        if not isinstance(images, torch.Tensor):
            raise UsageError(f"cannot use a {type(images).__name__} as images")
        images = images[None] if images.ndim == 3 else images
        size, channels = self.vae.config.resolution, self.vae.config.in_channels
        if images.ndim != 4 or images.shape[1] != channels or images.shape[-2:] != (size, size):
            raise UsageError(
                f"images of shape {tuple(images.shape)} do not fit this model: it works on "
                f"{channels}-channel {size}x{size} images"
            )
        param = next(self.vae.parameters())
        return images.to(device=param.device, dtype=param.dtype)

    @inference
    def classify(self, images) -> torch.Tensor:
        """The class under which each image is most likely (lowest -ELBO; a uniform prior over classes)."""
        x = self.preprocess(images)
        classes = range(self.vae.config.num_classes)
        scores = [self.vae.negative_elbo(x, torch.full((len(x),), c, device=x.device)) for c in classes]
        return torch.stack(scores, dim=1).argmin(dim=1)

    @inference
    def encode(self, images, class_labels=None):
        """q(z | x, y) (a DiagonalGaussianDistribution); the class is inferred when not given."""
        x = self.preprocess(images)
        labels = self.classify(x) if class_labels is None else self._labels(class_labels, len(x))
        return self.vae.encode(x, labels).latent_dist

    @inference
    def reconstruct(self, images, class_labels=None, output_type: str = "pil", return_dict: bool = True):
        """Decode each image's posterior mean with its class (inferred when not given)."""
        x = self.preprocess(images)
        labels = self.classify(x) if class_labels is None else self._labels(class_labels, len(x))
        z = self.vae.encode(x, labels).latent_dist.mode()
        return self._output(self.vae.decode(z, labels).sample, output_type, return_dict)

    @inference
    def variations(
        self,
        image,
        num_variations: int = 8,
        class_label=None,
        temperature: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Resample around one image's posterior: z = mean + temperature * std * eps, decoded with its class
        (the posterior, not the prior, whatever prior the VAE holds)."""
        if not temperature >= 0:
            raise UsageError(f"temperature must be >= 0, got {temperature}")
        x = self.preprocess(image)
        if len(x) != 1:
            raise UsageError(f"variations takes one image, got {len(x)}")
        label = self.classify(x) if class_label is None else self._labels(class_label, 1)
        posterior = self.vae.encode(x, label).latent_dist
        z = posterior.mean + posterior.std * (temperature * self.noise(num_variations, generator))
        return self._output(self.vae.decode(z, label.expand(num_variations)).sample, output_type, return_dict)

    @inference
    def interpolate(
        self,
        start,
        end,
        num_steps: int = 8,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images along a straight line between two endpoints, each an image or a class (index or name).

        An image endpoint gives its posterior mean and its (inferred) class's embedding; a class
        endpoint gives that class's embedding and the other endpoint's z, or, between two classes,
        each class's prior draw (at `temperature`) from one shared noise, so only the cell type changes
        (with an N(0, I) prior the two draws are one z).
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise UsageError(f"num_steps must be an integer >= 2, got {num_steps!r}")
        (z0, e0, y0), (z1, e1, y1) = [self._endpoint(e) for e in (start, end)]
        if z0 is None and z1 is None:
            draws = self._class_draws(torch.cat([y0, y1]), generator, temperature)
            z0, z1 = draws[:1], draws[1:]
        z0, z1 = (z1 if z0 is None else z0), (z0 if z1 is None else z1)
        t = torch.linspace(0, 1, num_steps, device=z0.device, dtype=z0.dtype)
        z = torch.lerp(z0, z1, t.view(-1, 1, 1, 1))
        embeds = torch.lerp(e0, e1, t.view(-1, 1))
        return self._output(self.vae.decode(z, class_embeds=embeds).sample, output_type, return_dict)

    def _class_draws(self, labels: torch.Tensor, generator, temperature: float) -> torch.Tensor:
        """One prior draw per label ([2, *latent_shape]) from the same noise: what `generator` gives one image."""
        if not self.vae.config.prior_components:
            shared = self.prior_latents(1, generator, temperature)
            return torch.cat([shared, shared])
        eps = self.noise(1, generator).expand(len(labels), -1, -1, -1)
        uniforms = uniform_draws(1, generator).to(eps.device).expand(len(labels))
        return self.vae.prior_sample(labels, eps, uniforms, temperature)

    def _endpoint(self, value) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(z or None, class embedding [1, E], label [1]) for one end of an interpolation."""
        if isinstance(value, (int, str, np.integer)):
            label = self._labels(value, 1)
            return None, self.vae.class_embedding(label), label
        x = self.preprocess(value)
        if len(x) != 1:
            raise UsageError(f"an interpolation endpoint is one image, got {len(x)}")
        label = self.classify(x)
        return self.vae.encode(x, label).latent_dist.mode(), self.vae.class_embedding(label), label

    def _output(self, images: torch.Tensor, output_type: str, return_dict: bool):
        images = postprocess(images, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def uniform_draws(num_images: int, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """One uniform number in [0, 1) per image (float64, on the generators' device), from generator i for image i
    when given a list, as diffusers' randn_tensor draws the noise."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64) for g in generator])
    device = generator.device if generator is not None else "cpu"
    return torch.rand(num_images, generator=generator, device=device, dtype=torch.float64)
