"""Issue 32: class labels as diffusers' class-conditional pipeline (DiTPipeline) takes them, on every pipeline:
`id2label`, `get_label_ids(names)`, and `pipe(class_labels=[...])` making one image per label.
(tests/test_remote_code.py checks the same of the bundled folders loaded without bloodgen_hf.)"""

from __future__ import annotations

import pytest
import torch

import tests.conftest as fixtures
from bloodgen_hf.data import CLASS_NAMES
from bloodgen_hf.errors import UsageError
from bloodgen_hf.pipelines import BloodDDPMPipeline

FAMILIES = ["gan", "ddpm", "vae", "ldm"]


def tiny(family: str):
    return getattr(fixtures, f"tiny_{family}_pipeline")()


def call(pipe, *args, seeds=None, **kwargs):
    steps = {"num_inference_steps": 2} if hasattr(pipe, "scheduler") else {}
    generator = None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(*args, generator=generator, output_type="pt", **steps, **kwargs).images


@pytest.mark.parametrize("family", FAMILIES)
def test_id2label_and_get_label_ids(family):
    pipe = tiny(family)
    assert pipe.id2label == dict(enumerate(CLASS_NAMES))
    assert pipe.labels == {name: i for i, name in enumerate(CLASS_NAMES)}
    assert pipe.get_label_ids(["platelet", "Immature granulocytes", "BASOPHIL"]) == [7, 3, 0]
    assert pipe.get_label_ids("lymphocyte") == [4]  # one name, not its letters
    with pytest.raises(UsageError, match="unknown class 'white shark'; choose from: basophil, eosinophil, .*platelet"):
        pipe.get_label_ids(["platelet", "white shark"])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_list_of_class_labels_gives_one_image_per_label(family):
    pipe = tiny(family)
    labels = pipe.get_label_ids(["platelet", "basophil", "monocyte"])
    images = call(pipe, class_labels=labels, seeds=[4, 5, 6])
    assert images.shape[0] == 3
    torch.testing.assert_close(images, call(pipe, 3, class_labels=labels, seeds=[4, 5, 6]))  # as if num_images=3
    assert call(pipe, class_labels=torch.tensor([0, 1])).shape[0] == 2
    assert call(pipe, class_labels=["eosinophil"]).shape[0] == 1
    # unchanged: no labels or one label (not a list) give num_images, 8 by default
    assert call(pipe).shape[0] == 8 and call(pipe, class_labels="platelet").shape[0] == 8
    assert call(pipe, 2, class_labels=7).shape[0] == 2 and call(pipe, 3, class_labels=torch.tensor(7)).shape[0] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_a_count_that_disagrees_with_the_labels_is_one_clear_error(family):
    pipe = tiny(family)
    with pytest.raises(ValueError, match=r"got 3 class labels for 8 images: give one label per image, or leave out"):
        pipe(num_images=8, class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="class_labels is an empty list"):
        pipe(class_labels=[])
    with pytest.raises(ValueError, match="got 2 generators for 3 images"):
        pipe(class_labels=[0, 1, 2], generator=[torch.Generator(), torch.Generator()])


def test_a_pipeline_saved_without_class_names_labels_its_classes_by_index():
    named = tiny("ddpm")
    pipe = BloodDDPMPipeline(unet=named.unet, scheduler=named.scheduler)
    assert pipe.class_names is None
    assert pipe.id2label == {i: str(i) for i in range(8)}
    assert pipe.get_label_ids(["3", "7"]) == [3, 7]
    with pytest.raises(ValueError, match="unknown class 'platelet'; choose from: 0, 1, 2"):
        pipe.get_label_ids(["platelet"])
