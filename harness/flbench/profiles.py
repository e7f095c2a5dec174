"""Acquisition profiles: the fixed intensity/blur/noise/resolution signature of each simulated clinic."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.fft import dctn, idctn
from scipy.ndimage import gaussian_filter, rotate


@dataclass(frozen=True)
class AcquisitionProfile:
    """How one clinic's scanner renders an image (docs/benchmarks.md).

    Applied in this order to images in [0, 1]: gamma, contrast/offset around 0.5, Gaussian blur, optional
    28→14→28 resolution loss, rotation, collimation crop, additive Gaussian noise (a fixed draw per image),
    Poisson (photon-count) noise, multiplicative speckle, inversion, JPEG-style DCT quantisation, clip to
    [0, 1]. The operations after resolution loss are ones the training augmentation never produces: they
    make clinics outside its envelope.
    """

    gamma: float = 1.0
    contrast: float = 1.0
    blur_sigma: float = 0.0
    noise_sd: float = 0.0
    offset: float = 0.0
    res_loss: bool = False
    #: Rotation in degrees (bilinear, edges repeat the border).
    rotate_deg: float = 0.0
    #: Fraction of each side blacked out, as a collimator shutter would (0 = none).
    collimation: float = 0.0
    #: Photons per unit intensity for Poisson noise (0 = none; lower is noisier).
    poisson_photons: float = 0.0
    #: SD of multiplicative speckle x·(1 + n), n ~ N(0, sd²).
    speckle_sd: float = 0.0
    #: Negative display (MONOCHROME1 shown as MONOCHROME2).
    invert: bool = False
    #: JPEG quality 1–100 of an 8×8 DCT quantisation with the standard luminance table (0 = none).
    jpeg_quality: int = 0

    def scaled(self, strength: float) -> AcquisitionProfile:
        """The profile moved toward identity: strength 0 is no change, 1 the full profile."""
        return AcquisitionProfile(
            gamma=float(self.gamma**strength),
            contrast=1.0 + strength * (self.contrast - 1.0),
            blur_sigma=strength * self.blur_sigma,
            noise_sd=strength * self.noise_sd,
            offset=strength * self.offset,
            res_loss=self.res_loss and strength >= 0.5,
            rotate_deg=strength * self.rotate_deg,
            collimation=strength * self.collimation,
            poisson_photons=self.poisson_photons / strength if strength > 0 and self.poisson_photons else 0.0,
            speckle_sd=strength * self.speckle_sd,
            invert=self.invert and strength >= 0.5,
            jpeg_quality=self.jpeg_quality if strength >= 0.5 else 0,
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
    if profile.rotate_deg:
        x = rotate(x, profile.rotate_deg, axes=(2, 1), reshape=False, order=1, mode="nearest")
    if profile.collimation > 0:
        x = collimate(x, profile.collimation)
    if profile.noise_sd > 0:
        x = x + rng.normal(0.0, profile.noise_sd, size=x.shape).astype(np.float32)
    if profile.poisson_photons > 0:
        lam = np.clip(x, 0.0, 1.0) * profile.poisson_photons
        x = (rng.poisson(lam) / profile.poisson_photons).astype(np.float32)
    if profile.speckle_sd > 0:
        x = x * (1.0 + rng.normal(0.0, profile.speckle_sd, size=x.shape)).astype(np.float32)
    if profile.invert:
        x = 1.0 - np.clip(x, 0.0, 1.0)
    if profile.jpeg_quality > 0:
        x = jpeg_quantize(np.clip(x, 0.0, 1.0), profile.jpeg_quality)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def collimate(x: np.ndarray, fraction: float) -> np.ndarray:
    """Black out ``fraction`` of each side of (N, H, W) images (at least one pixel when fraction > 0)."""
    h, w = x.shape[1:]
    dh, dw = max(1, round(h * fraction)), max(1, round(w * fraction))
    out = np.zeros_like(x)
    out[:, dh : h - dh, dw : w - dw] = x[:, dh : h - dh, dw : w - dw]
    return out


#: The JPEG standard's luminance quantisation table (quality 50), row-major 8×8.
_JPEG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float32,
)


def jpeg_quantize(x01: np.ndarray, quality: int) -> np.ndarray:
    """The lossy step of baseline JPEG on (N, H, W) in [0, 1]: 8-bit levels, 8×8 orthonormal DCT, rounding
    to the quality-scaled luminance table, inverse DCT. Sides are padded by edge repetition to multiples of
    8 (as an encoder does) and cropped back. Entropy coding is lossless and left out."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1–100, got {quality}")
    n, h0, w0 = x01.shape
    x01 = np.pad(x01, ((0, 0), (0, -h0 % 8), (0, -w0 % 8)), mode="edge")
    h, w = x01.shape[1:]
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    table = np.clip(np.floor((_JPEG_LUMA * scale + 50) / 100), 1, 255)  # libjpeg's quality scaling
    levels = x01 * 255.0 - 128.0
    blocks = levels.reshape(n, h // 8, 8, w // 8, 8).transpose(0, 1, 3, 2, 4)  # (N, h/8, w/8, 8, 8)
    coef = dctn(blocks, axes=(-2, -1), norm="ortho")
    restored = idctn(np.round(coef / table) * table, axes=(-2, -1), norm="ortho")
    out = restored.transpose(0, 1, 3, 2, 4).reshape(n, h, w)[:, :h0, :w0]
    return ((out + 128.0) / 255.0).astype(np.float32)
