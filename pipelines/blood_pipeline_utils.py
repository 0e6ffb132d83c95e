"""Helpers shared by the bloodgen pipelines: class-label parsing and output conversion.

Imports only torch/numpy/PIL/diffusers: this file travels with saved pipelines as remote code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "pt")


def resolve_class_labels(
    class_labels: None | int | str | Sequence[int | str] | torch.Tensor,
    num_images: int,
    class_names: Sequence[str] | None,
    num_classes: int,
) -> torch.Tensor:
    """None -> classes in turn (balanced); one class -> all images of it; a sequence -> one label per image."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if class_labels is None:
        return torch.arange(num_images) % num_classes
    if isinstance(class_labels, (int, str, np.integer)):
        return torch.full((num_images,), class_to_index(class_labels, class_names, num_classes))
    labels = [class_to_index(c, class_names, num_classes) for c in list(class_labels)]
    if len(labels) != num_images:
        raise ValueError(f"got {len(labels)} class labels for {num_images} images")
    return torch.tensor(labels, dtype=torch.long)


def class_to_index(label: int | str, class_names: Sequence[str] | None, num_classes: int) -> int:
    if isinstance(label, torch.Tensor):
        label = int(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < num_classes:
            return int(label)
        raise ValueError(f"class index {label} out of range 0..{num_classes - 1}")
    key = str(label).strip().lower().replace("-", "_").replace(" ", "_")
    if key.isdigit():
        return class_to_index(int(key), class_names, num_classes)
    for i, name in enumerate(class_names or ()):
        if key in (name, name + "s"):
            return i
    raise ValueError(f"unknown class {label!r}; choose from: {', '.join(class_names or map(str, range(num_classes)))}")


def postprocess(images: torch.Tensor, output_type: str):
    """[-1, 1] NCHW -> PIL list, float NHWC numpy in [0, 1], or float NCHW tensor in [0, 1]."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    images = (images.float().clamp(-1, 1) + 1) / 2
    if output_type == "pt":
        return images.cpu()
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


class BloodPipelineMixin:
    """`pipe.push_to_hub(repo_id)` publishes the remote-code layout, a sample grid and a model card
    (diffusers' own push would point model_index.json at bloodgen_hf's modules)."""

    def push_to_hub(self, repo_id: str, **kwargs):
        try:
            from bloodgen_hf.hub import push_to_hub
        except ImportError as err:
            raise ImportError("pushing a bloodgen pipeline needs the bloodgen-hf package installed") from err
        return push_to_hub(self, repo_id, **kwargs)
