"""Feature extractors behind one small interface: clean-fid's Inception-v3 and the domain BloodNet.

An extractor turns uint8 NHWC images into `Features` (vectors, plus class probabilities when it has
a classifier head) and has an `identity` string that changes whenever its outputs could (a hash of
the weights file): cached real features are keyed by it.

Inception weights are looked for in this order: `--inception-weights PATH`, $BLOODGEN_INCEPTION_WEIGHTS,
clean-fid's own download location (which clean-fid fills when there is internet). When none works
the user gets one line saying how to provide them or to pick `--extractor bloodnet`: the metric is
never swapped silently.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bloodgen_hf.errors import UsageError

INCEPTION_ENV = "BLOODGEN_INCEPTION_WEIGHTS"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
CLEANFID_DOWNLOAD_DIR = Path("/tmp")  # where cleanfid.features.feature_extractor puts it (non-Windows)
DOWNLOAD_TIMEOUT_S = 30
EXTRACTORS = ("inception", "bloodnet")


class MissingWeightsError(FileNotFoundError):
    """Weights a metric needs are absent or unreadable; the message says how to provide them."""


@dataclass
class Features:
    features: np.ndarray  # float32 [N, D]
    probs: np.ndarray | None = None  # float32 [N, C] class probabilities, if the extractor classifies

    def subset(self, index: np.ndarray) -> Features:
        return Features(self.features[index], None if self.probs is None else self.probs[index])


class FeatureExtractor:
    """What evaluation needs from a feature extractor. `name` labels metrics ('fid' is only ever
    Inception), `identity` keys caches, `extract` maps uint8 NHWC images to Features."""

    name: str = "extractor"
    identity: str = ""
    has_probs: bool = False

    def extract(self, images: np.ndarray, progress: bool = True, desc: str = "features") -> Features:
        raise NotImplementedError


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- Inception (clean-fid, mode "clean") ---------------------------------------------------------------


def missing_inception_message(reason: str) -> str:
    return (
        f"Inception-v3 weights for FID are unavailable ({reason}): download {INCEPTION_URL} where there is "
        f"internet and pass --inception-weights PATH (or set ${INCEPTION_ENV}), or use --extractor bloodnet "
        "(domain features; its Fréchet distance is reported as fd_bloodnet, not FID)"
    )


def resolve_inception_weights(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The TorchScript file to load: explicit path, env var, clean-fid's cache, or clean-fid's download."""
    chosen = path or os.environ.get(INCEPTION_ENV)
    if chosen:
        file = Path(chosen).expanduser()
        file = file / INCEPTION_FILE if file.is_dir() else file
        if not file.is_file():
            raise MissingWeightsError(missing_inception_message(f"{file} does not exist"))
        return file
    cached = CLEANFID_DOWNLOAD_DIR / INCEPTION_FILE
    if cached.is_file():
        return cached
    if not download:
        raise MissingWeightsError(missing_inception_message(f"{cached} not found"))
    return download_inception(CLEANFID_DOWNLOAD_DIR)


def download_inception(folder: Path) -> Path:
    """clean-fid's own download (same URL and file name), with a timeout so offline machines fail fast."""
    from cleanfid.downloads_helper import check_download_inception

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return Path(check_download_inception(fpath=str(folder)))
    except Exception as err:  # URLError, timeouts, HTTP errors: all mean "not downloadable here"
        partial = folder / INCEPTION_FILE
        partial.unlink(missing_ok=True)  # clean-fid writes straight to the final name
        raise MissingWeightsError(missing_inception_message(f"download failed: {err}")) from err
    finally:
        socket.setdefaulttimeout(previous)


def load_clean_inception(file: Path, device: torch.device):
    """clean-fid's InceptionV3W (resize outside the net, `layers` -> 2048-d pool features), from any path.

    Loading is clean-fid's own: `torch.jit.load` of the TorchScript file (here mapped to the CPU
    first, so a CPU-only machine can read it); nothing is unpickled with torch.load.
    """
    from cleanfid.inception_torchscript import InceptionV3W

    class CleanInception(InceptionV3W):
        def __init__(self, base):
            torch.nn.Module.__init__(self)  # InceptionV3W.__init__ only loads from its fixed file name
            self.base, self.layers, self.resize_inside = base, base.layers, False

    try:
        base = torch.jit.load(str(file), map_location="cpu").eval()
        model, _ = CleanInception(base), base.output.weight  # the 1008-way head, for the Inception Score
    except (RuntimeError, AttributeError, ValueError) as err:
        raise MissingWeightsError(
            f"{file} is not clean-fid's Inception TorchScript file ({str(err).strip().splitlines()[0]}); "
            f"delete it and download {INCEPTION_URL} again"
        ) from err
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, model.base.output.weight.detach()


class _CleanResized(torch.utils.data.Dataset):
    """Each image resized to 299x299 with clean-fid's 'clean' resizer (PIL bicubic on float channels)."""

    def __init__(self, images: np.ndarray):
        from cleanfid.resize import build_resizer

        self.images, self.resize = images, build_resizer("clean")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.resize(self.images[i]).transpose(2, 0, 1).copy())


class InceptionExtractor(FeatureExtractor):
    """clean-fid mode "clean": PIL-bicubic resize to 299, Inception-v3 pool3 features (2048-d), and the
    1008-way softmax without output bias (what the Inception Score was defined on)."""

    name = "inception"
    has_probs = True

    def __init__(self, weights: Path, device: str | torch.device = "cpu", batch_size: int = 64, num_workers: int = 0):
        self.weights = Path(weights)
        self.device = torch.device(device)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.identity = f"clean-fid-inception-v3-clean:{file_sha256(self.weights)}"
        self.model, self.output_weight = load_clean_inception(self.weights, self.device)

    @torch.no_grad()
    def extract(self, images: np.ndarray, progress: bool = True, desc: str = "inception") -> Features:
        loader = torch.utils.data.DataLoader(
            _CleanResized(images), batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False
        )
        features, probs = [], []
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
            x = batch.to(self.device).contiguous(memory_format=torch.channels_last)
            f = self.model(x)
            features.append(f.float().cpu())
            probs.append(torch.softmax(f @ self.output_weight.T, dim=1).float().cpu())
        return Features(torch.cat(features).numpy(), torch.cat(probs).numpy())


# --- BloodNet (domain classifier) --------------------------------------------------------------------


def resolve_bloodnet(path: str | os.PathLike | None = None, resolution: int | None = None) -> Path:
    """`--bloodnet PATH`, $BLOODGEN_BLOODNET, else the bundled BloodNet for `resolution` px (bloodgen_hf/weights/
    bloodnet at 28 px or None, weights/bloodnet-<N> at N px); a folder holding config.json + weights, or holding
    them under classifier/. A size with no bundled BloodNet is refused rather than scored by another size's."""
    from bloodgen_hf.evaluation.bloodnet import BLOODNET_ENV, BUNDLED_BLOODNET, bundled_bloodnet, train_bloodnet_hint

    given = path or os.environ.get(BLOODNET_ENV)
    if given:
        return classifier_folder(Path(given).expanduser())
    bundled = bundled_bloodnet(resolution)
    if bundled != BUNDLED_BLOODNET and not bundled.is_dir():
        raise MissingWeightsError(
            f"no bundled BloodNet for {resolution} px: pass --bloodnet PATH, a BloodNet trained at that size "
            f"({train_bloodnet_hint(resolution)})"
        )
    return classifier_folder(bundled)


def classifier_folder(folder: Path) -> Path:
    """The folder holding BloodNet's config.json: `folder` itself or its classifier/ (a saved BloodNet pipeline)."""
    if (folder / "classifier").is_dir():
        folder = folder / "classifier"
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(
            f"no BloodNet classifier at {folder}: train it with `python train_scripts/train_bloodnet.py "
            "--data-dir ../shared/data` and copy runs/bloodnet/pipeline to bloodgen_hf/weights/bloodnet, "
            "or pass --bloodnet PATH"
        )
    return folder


def load_bloodnet(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", resolution: int | None = None
):
    """(BloodNet in eval mode, its weights file) via the hub's loader (safetensors, errors name the file);
    `resolution` picks the bundled one when no folder is given."""
    from bloodgen_hf.evaluation.bloodnet import BloodNet
    from bloodgen_hf.registry import WEIGHTS_NAME, load_component

    folder = resolve_bloodnet(path, resolution)
    return load_component(BloodNet, folder).to(device).eval(), folder / WEIGHTS_NAME


class BloodNetExtractor(FeatureExtractor):
    """Pooled penultimate BloodNet activations and its softmax over the classes it was trained on."""

    name = "bloodnet"
    has_probs = True

    def __init__(self, model, identity: str, batch_size: int = 512, folder: Path | None = None):
        self.model, self.identity, self.batch_size, self.folder = model, identity, batch_size, folder

    @classmethod
    def load(
        cls, path=None, device: str | torch.device = "cpu", batch_size: int = 512, resolution: int | None = None
    ) -> BloodNetExtractor:
        """BloodNet from `path`, else $BLOODGEN_BLOODNET, else the bundled one for `resolution` px."""
        model, weights = load_bloodnet(path, device, resolution)
        return cls(model, f"bloodnet:{file_sha256(weights)}", batch_size, weights.parent)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes it was trained on ('0', '1', ... if it was saved without names)."""
        names = self.model.config.get("class_names")
        return tuple(names) if names else tuple(str(i) for i in range(self.model.config.num_classes))

    @property
    def resolution(self) -> int:
        """The image size it was trained at (it resizes other sizes to it, so evaluation refuses them)."""
        return int(self.model.config.resolution)

    def extract(self, images: np.ndarray, progress: bool = True, desc: str = "bloodnet") -> Features:
        from bloodgen_hf.evaluation.bloodnet import predict

        features, logits = predict(self.model, images, self.batch_size, progress=progress, desc=desc)
        return Features(features, torch.softmax(torch.from_numpy(logits), dim=1).numpy())

    def classify(self, images: np.ndarray) -> np.ndarray:
        from bloodgen_hf.evaluation.bloodnet import predict

        return predict(self.model, images, self.batch_size, with_features=False, progress=False)[1].argmax(axis=1)


def build_extractor(
    name: str,
    device: str | torch.device = "cpu",
    inception_weights: str | None = None,
    bloodnet: str | None = None,
    num_workers: int = 0,
    batch_size: int | None = None,
    resolution: int | None = None,
) -> FeatureExtractor:
    """The extractor `name`; `resolution`, the size scored at, picks the bundled BloodNet when none is named."""
    if name == "inception":
        weights = resolve_inception_weights(inception_weights)
        return InceptionExtractor(weights, device, batch_size or 64, num_workers)
    if name == "bloodnet":
        return BloodNetExtractor.load(bloodnet, device, batch_size or 512, resolution)
    raise UsageError(f"unknown --extractor {name!r}; choose from: {', '.join(EXTRACTORS)}")
