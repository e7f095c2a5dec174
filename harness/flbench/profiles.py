"""Acquisition profiles: the fixed intensity/blur/noise/resolution signature of each simulated clinic."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter


@dataclass(frozen=True)
class AcquisitionProfile:
    """How one clinic's scanner renders an image (docs/benchmarks.md).

    Applied in this order to images in [0, 1]: gamma, contrast/offset around 0.5, Gaussian blur, optional
    28→14→28 resolution loss, additive Gaussian noise (a fixed draw per image), clip to [0, 1].
    """

    gamma: float = 1.0
    contrast: float = 1.0
    blur_sigma: float = 0.0
    noise_sd: float = 0.0
    offset: float = 0.0
    res_loss: bool = False

    def scaled(self, strength: float) -> AcquisitionProfile:
        """The profile moved toward identity: strength 0 is no change, 1 the full profile."""
        return AcquisitionProfile(
            gamma=float(self.gamma**strength),
            contrast=1.0 + strength * (self.contrast - 1.0),
            blur_sigma=strength * self.blur_sigma,
            noise_sd=strength * self.noise_sd,
            offset=strength * self.offset,
            res_loss=self.res_loss and strength >= 0.5,
        )


IDENTITY = AcquisitionProfile()

#: Clinic A..F (A, B = large hospitals) and the unseen clinic, at full strength (s = 1).
CLINIC_PROFILES: dict[str, AcquisitionProfile] = {
    "A": AcquisitionProfile(gamma=0.90, contrast=1.05, blur_sigma=0.0, noise_sd=0.01, offset=0.0),
    "B": AcquisitionProfile(gamma=1.30, contrast=0.90, blur_sigma=0.5, noise_sd=0.02, offset=0.03),
    "C": AcquisitionProfile(gamma=0.60, contrast=1.25, blur_sigma=0.0, noise_sd=0.05, offset=-0.05),
    "D": AcquisitionProfile(gamma=1.60, contrast=0.70, blur_sigma=1.2, noise_sd=0.0, offset=0.10),
    "E": AcquisitionProfile(gamma=1.10, contrast=0.80, blur_sigma=0.3, noise_sd=0.08, offset=0.05),
    "F": AcquisitionProfile(
        gamma=0.75, contrast=1.00, blur_sigma=0.8, noise_sd=0.03, offset=-0.08, res_loss=True
    ),
}
UNSEEN_PROFILE = AcquisitionProfile(
    gamma=1.45, contrast=0.75, blur_sigma=1.0, noise_sd=0.06, offset=0.08, res_loss=True
)


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) → float32 in [0, 1]."""
    return images.astype(np.float32) / 255.0


def downsample_upsample(x: np.ndarray) -> np.ndarray:
    """Resolution loss: 2×2 block mean then nearest upsampling, on (N, H, W) with even H and W."""
    n, h, w = x.shape
    coarse = x.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))  # (N, H/2, W/2)
    return np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)


def render(images01: np.ndarray, profile: AcquisitionProfile, rng: np.random.Generator) -> np.ndarray:
    """Apply a profile to float images (N, H, W) in [0, 1]; the noise is drawn once from ``rng``."""
    x = np.clip(images01, 0.0, 1.0).astype(np.float32) ** np.float32(profile.gamma)
    x = (x - 0.5) * np.float32(profile.contrast) + 0.5 + np.float32(profile.offset)
    if profile.blur_sigma > 0:
        # Blur within each image only (sigma 0 along the batch axis).
        x = gaussian_filter(x, sigma=(0.0, profile.blur_sigma, profile.blur_sigma), mode="nearest")
    if profile.res_loss:
        x = downsample_upsample(x)
    if profile.noise_sd > 0:
        x = x + rng.normal(0.0, profile.noise_sd, size=x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)
