"""Training augmentations, batched in torch: a fresh acquisition-like intensity profile per image, and random
convolutions that change local texture and contrast (polarity included) while keeping shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class IntensityAugment:
    """Per image: random gamma, contrast/offset around 0.5, Gaussian blur, resolution loss and noise.

    The ranges cover plausible scanner/export differences (the benchmark's simulated clinic profiles lie
    inside them: that is the point of the lever, and docs/benchmarks.md says so). Works on images in
    [0, 1], (B, 1, H, W); returns the same shape, clipped to [0, 1].
    """

    log_gamma: float = 0.6  # gamma = exp(U(-0.6, 0.6)) ∈ [0.55, 1.82]
    contrast: tuple[float, float] = (0.65, 1.35)
    offset: float = 0.12
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 1.4)
    res_loss_p: float = 0.25
    noise_sd: float = 0.09
    p: float = 0.8  # probability that an image is augmented at all

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]

        def u(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=gen)

        def bern(p: float) -> torch.Tensor:
            return (torch.rand(b, 1, 1, 1, generator=gen) < p).float()

        apply = bern(self.p)
        gamma = torch.exp(u(-self.log_gamma, self.log_gamma))
        y = x.clamp(0.0, 1.0) ** gamma
        y = (y - 0.5) * u(*self.contrast) + 0.5 + u(-self.offset, self.offset)
        y = gaussian_blur(y, u(*self.blur_sigma).reshape(b) * bern(self.blur_p).reshape(b))
        low = F.interpolate(F.avg_pool2d(y, 2), scale_factor=2, mode="nearest")
        do_res = bern(self.res_loss_p)
        y = do_res * low + (1 - do_res) * y
        y = y + torch.randn(y.shape, generator=gen) * u(0.0, self.noise_sd)
        return (apply * y + (1 - apply) * x).clamp(0.0, 1.0)


@dataclass(frozen=True)
class RandomConvolution:
    """Per image, with probability ``p``: a random k × k filter mixed with the image, in the network's input
    space.

    k is drawn from ``kernel_sizes``; the filter's weights are N(0, 1/k²) (unit gain on average over the
    k² inputs, so the output keeps the input's scale); the output is α·z + (1 − α)·(filter ⋆ z) with
    α ~ U(0, 1). A 1 × 1 filter with a negative weight turns contrast over; larger ones blur, sharpen or
    emboss texture. Shapes stay where they were, so the label does. Works on normalised images
    (B, 1, H, W), not clipped (the network's input is not bounded either).
    """

    kernel_sizes: tuple[int, ...] = (1, 3, 5, 7)
    p: float = 0.5

    def __post_init__(self) -> None:
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel sizes must be odd and positive, got {self.kernel_sizes}")

    def __call__(self, z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = z.shape[0]
        if z.ndim != 4 or z.shape[1] != 1:
            raise ValueError(f"random convolutions work on (B, 1, H, W) images, got {tuple(z.shape)}")
        if b == 0:
            return z
        big = max(self.kernel_sizes)
        sizes = torch.tensor(self.kernel_sizes)[
            torch.randint(len(self.kernel_sizes), (b,), generator=gen)
        ]  # (B,)
        # Each image's k × k filter sits in the centre of a big × big one; the rest is zero.
        weights = torch.randn(b, big, big, generator=gen) / sizes.reshape(b, 1, 1).to(z.dtype)
        offsets = (torch.arange(big) - big // 2).abs()  # (big,)
        inside = offsets.reshape(1, -1) <= (sizes.reshape(b, 1) // 2)  # (B, big)
        kernel = weights * (inside.reshape(b, big, 1) & inside.reshape(b, 1, big)).to(z.dtype)
        r = big // 2
        padded = F.pad(z.reshape(1, b, *z.shape[2:]), (r, r, r, r), mode="replicate")
        filtered = F.conv2d(padded, kernel.reshape(b, 1, big, big), groups=b).reshape(z.shape)
        alpha = torch.rand(b, 1, 1, 1, generator=gen, dtype=z.dtype)
        apply = (torch.rand(b, 1, 1, 1, generator=gen) < self.p).to(z.dtype)
        mixed = alpha * z + (1 - alpha) * filtered
        return apply * mixed + (1 - apply) * z


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur with its own sigma (0 = no blur): (B, 1, H, W) → (B, 1, H, W)."""
    b = x.shape[0]
    radius = max(1, math.ceil(3 * float(sigma.max()))) if float(sigma.max()) > 0 else 0
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)  # (K,)
    safe = sigma.clamp_min(1e-3).reshape(b, 1)
    kernel = torch.exp(-0.5 * (offsets.reshape(1, -1) / safe) ** 2)  # (B, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(x.dtype).reshape(1, -1).expand(b, -1)
    kernel = torch.where(sigma.reshape(b, 1) > 0, kernel, identity)
    # Grouped conv: the batch becomes channels so every image uses its own kernel.
    y = F.pad(x.reshape(1, b, *x.shape[2:]), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.reshape(b, 1, 1, -1), groups=b)  # horizontal pass
    y = F.conv2d(y, kernel.reshape(b, 1, -1, 1), groups=b)  # vertical pass
    return y.reshape(x.shape)
