"""What a run learns from, and its record (bloodgen_hf.provenance): the real images of --dataset/--split, or
the subset R_f of them that --subset-fraction picks, and the model its weights start from.

`load_training_data` is what most families hand `core.run_training` as their data; the student builds its
own from the teacher's pairs but records its starting weights with `weights_origin` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bloodgen_hf.data import LabelledImages
from bloodgen_hf.provenance import check_subset_options, origin_record, real_subset, subset_record, training_provenance
from bloodgen_hf.training.checkpoint import resolve_resume
from bloodgen_hf.training.core import TrainConfig
from bloodgen_hf.training.resume import recorded_settings


def load_training_data(config: TrainConfig) -> tuple[LabelledImages, dict[str, Any]]:
    """The real images of --dataset/--split (or its subset) and their provenance: what most tasks train on."""
    dataset = LabelledImages.load(config.split, config.resolution, config.data_dir, config.flip, config.dataset)
    return training_data(config, dataset)


def training_data(config: TrainConfig, dataset: LabelledImages) -> tuple[LabelledImages, dict[str, Any]]:
    """The images the run trains on (with --subset-fraction, only the subset R_f of the split) and their
    provenance, which the saved pipeline and train_config.json record."""
    check_subset_options(config.subset_fraction, config.subset_seed)
    subset = None
    if config.subset_fraction is not None:
        indices = real_subset(dataset.labels.numpy(), config.subset_fraction, config.subset_seed)
        subset = subset_record(indices, config.subset_fraction, config.subset_seed, len(dataset))
        index = torch.from_numpy(indices)
        dataset = LabelledImages(
            dataset.images[index].numpy(), dataset.labels[index].numpy(), dataset.flip, dataset.class_names
        )
    origin = origin_record(weights_origin(config))
    return dataset, training_provenance(config.dataset, config.resolution, config.split, len(dataset), subset, origin)


def weights_origin(config: TrainConfig) -> str | None:
    """The model the weights started from (its data is in them too): --init-from, or on --resume the one the
    run was started with, as its checkpoint recorded (a resume takes its weights from there)."""
    if not config.resume:
        return config.init_from
    recorded = recorded_settings(resolve_resume(Path(config.output_dir), config.resume)) or {}
    return recorded.get("init_from", config.init_from)
