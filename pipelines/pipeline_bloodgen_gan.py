"""BloodGANPipeline: class-conditional blood-cell images from a conditional DCGAN generator."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .blood_pipeline_utils import BloodPipelineMixin, UsageError, postprocess, resolve_class_labels


class BloodGANPipeline(BloodPipelineMixin, DiffusionPipeline):
    """One generator forward pass per batch: z ~ N(0, I), label -> image.

    `class_labels`: a list of labels (class indices or names) gives one image per label, as in diffusers'
    DiTPipeline; one label or None gives `num_images` (default 8) of it or of the classes in turn.
    `generator` may be one torch.Generator or a list with one per image (then every image is
    reproducible on its own, whatever the batch it was drawn in). `provenance` records the data it was
    trained on (see bloodgen_hf/provenance.py); saved in provenance.json (a summary in model_index.json).
    """

    model_cpu_offload_seq = "gan"
    remote_code_modules = {"gan": "bloodgen_gan_models"}  # bloodgen_hf/models/gan.py ships as this

    def __init__(self, gan, provenance: dict | None = None):
        super().__init__()
        self.register_modules(gan=gan)
        self.register_to_config(provenance=dict(provenance) if provenance else None)

    @property
    def class_names(self) -> list[str] | None:
        names = self.gan.config.get("class_names")
        return list(names) if names else None

    @property
    def num_classes(self) -> int:
        return self.gan.config.num_classes

    @property
    def resolution(self) -> int:
        """The side in pixels of the images it makes: the generator's configured size, known without sampling."""
        return int(self.gan.config.resolution)

    @torch.no_grad()
    def __call__(
        self,
        num_images: int | None = None,
        class_labels=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        labels = resolve_class_labels(class_labels, num_images, self.class_names, self.num_classes)
        num_images = len(labels)
        if isinstance(generator, list) and len(generator) != num_images:
            raise UsageError(f"got {len(generator)} generators for {num_images} images")
        param = next(self.gan.parameters())
        z = randn_tensor(
            (num_images, self.gan.config.latent_dim), generator=generator, device=param.device, dtype=param.dtype
        )
        self.gan.eval()
        images = postprocess(self.gan(z, labels.to(param.device)), output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
