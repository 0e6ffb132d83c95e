"""Full-reference image quality: PSNR and SSIM, in torch, per image.

A leaf module (torch only) because two layers need the same definitions: the autoencoder's optional SSIM loss
(training/autoencoder.py) and its reconstruction report (evaluation/reconstruction.py). SSIM is Wang et al.
(2004) as most libraries compute it: an 11x11 Gaussian window (sigma 1.5) applied separably to each channel
without padding, K1 = 0.01, K2 = 0.03, the map averaged over channels and positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA, dtype=torch.float32) -> torch.Tensor:
    """The normalised 1-D Gaussian of `size` taps."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    window = torch.exp(-(x**2) / (2 * sigma**2))
    return window / window.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Each channel of NCHW `x` filtered by the separable window, 'valid' positions only."""
    channels, size = x.shape[1], len(window)
    horizontal = window.view(1, 1, 1, size).expand(channels, 1, 1, size)
    vertical = window.view(1, 1, size, 1).expand(channels, 1, size, 1)
    return F.conv2d(F.conv2d(x, horizontal, groups=channels), vertical, groups=channels)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = WINDOW_SIZE,
    sigma: float = WINDOW_SIGMA,
) -> torch.Tensor:
    """[N] structural similarity of NCHW images `x` and `y` whose values span `data_range` (1 for [0, 1],
    2 for [-1, 1], 255 for uint8 values); 1 for identical images. Differentiable, so it can be a loss."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two NCHW batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim's {window_size}-pixel window does not fit {tuple(x.shape[-2:])} images")
    window = gaussian_window(window_size, sigma, x.dtype).to(x.device)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x**2
    var_y = _blur(y * y, window) - mu_y**2
    cov = _blur(x * y, window) - mu_x * mu_y
    similarity = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return similarity.flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """[N] peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE) per image; inf for identical images."""
    if x.shape != y.shape:
        raise ValueError(f"psnr needs two batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x - y).double().pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)
