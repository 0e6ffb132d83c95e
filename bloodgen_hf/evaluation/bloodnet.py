"""BloodNet: a compact ResNet that classifies BloodMNIST cells, used as the domain feature extractor.

Inception-v3 features were learned on ImageNet photos and see a 28x28 cell upscaled to 299x299;
a classifier trained on the cells themselves gives a feature space in which "looks like a real
eosinophil" is what distances measure. Its pooled penultimate activations are the features, its
softmax the class probabilities (for the Inception-Score analogue and class accuracy).

The model imports only torch + diffusers, like the generator files, and is saved with
`save_pretrained` (config.json + safetensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from tqdm.auto import tqdm

BUNDLED_BLOODNET = Path(__file__).resolve().parents[1] / "weights" / "bloodnet"  # the 28 px one
BUNDLED_BLOODNET_RESOLUTION = 28
BLOODNET_ENV = "BLOODGEN_BLOODNET"


def bundled_bloodnet(resolution: int | None = None) -> Path:
    """Where the bundled BloodNet for `resolution` px lives (weights/bloodnet at 28 px or None, else
    weights/bloodnet-<N>): BloodNet resizes to the size it was trained at, so each scoring size needs its own."""
    if resolution is None or resolution == BUNDLED_BLOODNET_RESOLUTION:
        return BUNDLED_BLOODNET
    return BUNDLED_BLOODNET.with_name(f"bloodnet-{resolution}")


def train_bloodnet_hint(resolution: int) -> str:
    """The commands that make and use a BloodNet for `resolution` px, for refusals that need one."""
    return (
        f"bloodgen-hf train bloodnet --resolution {resolution} --split train --output-dir runs/bloodnet-{resolution}, "
        f"then --bloodnet runs/bloodnet-{resolution}/pipeline"
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class BloodNet(ModelMixin, ConfigMixin):
    """ResNet for small images: a 3x3 stem, stages of BasicBlocks (each after the first halves the
    resolution), global average pooling -> features, dropout + linear -> class logits.

    Input: float NCHW in [-1, 1] at `resolution` (other sizes are resized, see `prepare`).
    """

    @register_to_config
    def __init__(
        self,
        resolution: int = 28,
        num_classes: int = 8,
        channels: Sequence[int] = (24, 48, 96),
        blocks_per_stage: int = 2,
        dropout: float = 0.1,
        class_names: Sequence[str] | None = None,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU()
        )
        blocks, width = [], channels[0]
        for stage, out in enumerate(channels):
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(width, out, stride=2 if stage > 0 and i == 0 else 1))
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, feature_dim], logits [N, num_classes])."""
        features = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return features, self.classifier(self.drop(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]

    def prepare(self, images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float NCHW in [-1, 1] at this net's resolution (antialiased resize if needed)."""
        images = torch.as_tensor(np.asarray(images_uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        size = self.config.resolution
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return images.to(self.device)


class ResNet18Classifier(ModelMixin, ConfigMixin):
    """MedMNIST's ResNet-18 for 28 px images: torchvision's resnet18 (no pretrained weights) with a 3x3
    stride-1 stem and no max-pool, the baseline MedMNIST v2 reports (0.958 test accuracy on BloodMNIST).
    Same interface as BloodNet (`forward_features`, `prepare`), so `predict` and the study use either."""

    @register_to_config
    def __init__(self, resolution: int = 28, num_classes: int = 8, class_names: Sequence[str] | None = None):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net

    @property
    def feature_dim(self) -> int:
        return self.net.fc.in_features

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        features = n.layer4(n.layer3(n.layer2(n.layer1(x)))).mean(dim=(2, 3))
        return features, n.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]

    prepare = BloodNet.prepare


@torch.no_grad()
def predict(
    model: BloodNet,
    images_uint8: np.ndarray,
    batch_size: int = 512,
    with_features: bool = True,
    progress: bool = False,
    desc: str = "bloodnet",
) -> tuple[np.ndarray | None, np.ndarray]:
    """(features float32 [N, D] or None, logits float32 [N, C]) for uint8 NHWC images, in eval mode."""
    if len(images_uint8) == 0:
        raise ValueError("no images to classify")
    was_training = model.training
    model.eval()
    features, logits = [], []
    starts = range(0, len(images_uint8), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        x = model.prepare(images_uint8[start : start + batch_size]).contiguous(memory_format=torch.channels_last)
        f, lg = model.forward_features(x)
        logits.append(lg.float().cpu())
        if with_features:
            features.append(f.float().cpu())
    model.train(was_training)
    return (torch.cat(features).numpy() if with_features else None), torch.cat(logits).numpy()
