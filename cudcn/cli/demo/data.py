"""Deformed handwritten digits: scikit-learn's bundled 8x8 digits, upscaled
and randomly rotated, scaled, shifted and elastically warped.

The 1797 digits are split once into training and test sources. Training
images are mild deformations of the training sources; two test sets deform
the test sources, one as mildly as the training set ("mild") and one more
strongly ("strong"): larger rotations, a wider range of scales and a
stronger elastic warp. The gap between the two test accuracies is what
geometric modelling has to close. Everything is drawn from one NumPy
Generator, so a data seed gives the same images on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Side of the images the networks see.
IMAGE_SIZE = 28
#: scikit-learn's bundled digits, and the part of them make_datasets keeps for
#: testing: the rest are the training digits.
SOURCE_DIGITS = 1797
TEST_FRACTION = 0.3
TRAINING_DIGITS = SOURCE_DIGITS - round(SOURCE_DIGITS * TEST_FRACTION)
#: Side of the upscaled digit inside the image, before deformation; the
#: margin leaves room for rotation, scaling and shifting.
DIGIT_SIZE = 20


@dataclass(frozen=True)
class Deformation:
    """Ranges of the random deformation of one image."""

    max_rotation_deg: float  # rotation uniform in [-max, max]
    scale_range: tuple[float, float]  # isotropic scale uniform in this range
    max_shift: float  # shift in pixels, uniform in [-max, max] per axis
    elastic_alpha: float  # strength of the elastic warp, in pixels
    elastic_sigma: float = 4.0  # smoothness of the elastic warp, in pixels


    def describe(self) -> str:
        """The ranges in words: "rotation ±15°, scale 0.9–1.1, shift ±1.5 px, elastic warp α = 16, σ = 4 px"."""
        low, high = self.scale_range
        return (f"rotation ±{self.max_rotation_deg:g}°, scale {low:g}–{high:g}, shift ±{self.max_shift:g} px, "
                f"elastic warp α = {self.elastic_alpha:g}, σ = {self.elastic_sigma:g} px")


MILD = Deformation(max_rotation_deg=15, scale_range=(0.9, 1.1), max_shift=1.5, elastic_alpha=16)
STRONG = Deformation(max_rotation_deg=45, scale_range=(0.7, 1.25), max_shift=3.0, elastic_alpha=40)


@dataclass
class Digits:
    """Images (n, 1, IMAGE_SIZE, IMAGE_SIZE) float32 in [0, 1] and labels (n,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int) -> "Digits":
        return Digits(self.images[:count], self.labels[:count])


def load_sources() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797, 8, 8) float64 in [0, 1], labels (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images / 16.0, digits.target.astype(np.int64)


def upscale(sources: np.ndarray) -> np.ndarray:
    """(n, 8, 8) -> (n, IMAGE_SIZE, IMAGE_SIZE): a cubic upscale to DIGIT_SIZE, centred."""
    from scipy.ndimage import zoom

    big = zoom(sources, (1, DIGIT_SIZE / 8, DIGIT_SIZE / 8), order=3, grid_mode=True, mode="grid-constant")
    out = np.zeros((len(sources), IMAGE_SIZE, IMAGE_SIZE))
    start = (IMAGE_SIZE - DIGIT_SIZE) // 2
    out[:, start:start + DIGIT_SIZE, start:start + DIGIT_SIZE] = big
    return np.clip(out, 0.0, 1.0)


def deform(images: np.ndarray, how: Deformation, rng: np.random.Generator) -> np.ndarray:
    """Each image (n, S, S) warped by its own random affine map and elastic field.

    For every output pixel we compute where to read in the input (the inverse
    map) and interpolate there; pixels read from outside the image are 0.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    n, size, _ = images.shape
    centre = (size - 1) / 2
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64) - centre
    out = np.empty_like(images)
    for index in range(n):
        angle = np.deg2rad(rng.uniform(-how.max_rotation_deg, how.max_rotation_deg))
        scale = rng.uniform(*how.scale_range)
        shift_r, shift_c = rng.uniform(-how.max_shift, how.max_shift, 2)
        # Elastic field as in Simard et al. (2003): smoothed uniform noise times alpha.
        noise = rng.uniform(-1, 1, (2, size, size))
        field = how.elastic_alpha * gaussian_filter(noise, (0, how.elastic_sigma, how.elastic_sigma))
        r = rows - shift_r + field[0]
        c = cols - shift_c + field[1]
        cos, sin = np.cos(angle), np.sin(angle)
        src_r = (cos * r - sin * c) / scale + centre
        src_c = (sin * r + cos * c) / scale + centre
        out[index] = map_coordinates(images[index], [src_r, src_c], order=1, mode="constant", cval=0.0)
    return out


def _as_digits(images: np.ndarray, labels: np.ndarray) -> Digits:
    return Digits(images[:, None].astype(np.float32), labels.copy())


def make_datasets(seed: int = 0, train_copies: int = 1, test_fraction: float = TEST_FRACTION) -> dict[str, Digits]:
    """{"train", "test_mild", "test_strong"}: deformed digits, deterministic in seed.

    The sources are split before deforming, so no test image comes from a
    training digit. The training set holds train_copies deformations of each
    training source.
    """
    rng = np.random.default_rng(seed)
    sources, labels = load_sources()
    order = rng.permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test_ids, train_ids = order[:n_test], order[n_test:]
    big = upscale(sources)

    train_images = np.concatenate([deform(big[train_ids], MILD, rng) for _ in range(train_copies)])
    train_labels = np.tile(labels[train_ids], train_copies)
    return {
        "train": _as_digits(train_images, train_labels),
        "test_mild": _as_digits(deform(big[test_ids], MILD, rng), labels[test_ids]),
        "test_strong": _as_digits(deform(big[test_ids], STRONG, rng), labels[test_ids]),
    }
