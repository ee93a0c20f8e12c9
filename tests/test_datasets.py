"""The 2-D toy densities and the data pipeline: shapes, each density's geometry, and batches that are a pure
function of (seed, step) with a held-out test set from a separate stream."""
import jax
import numpy as np
import pytest

import datasets
from configs.default_toy_configs import get_default_configs

TOYS = sorted(datasets.TOY_DATASETS)
GMM = dict(gmm_weights=[0.25, 0.75], gmm_means=[[-2.0, 0.0], [1.0, 1.0]], gmm_stds=[0.5, 0.8])


def _config(name, seed=0, batch_size=256, num_test=512):
    config = get_default_configs()
    config.seed = seed
    config.data.dataset = name
    if name == "gmm":
        config.data.update(GMM)
    config.training.batch_size = batch_size
    config.eval.num_test = num_test
    return config


def _sample(name, n=20_000, seed=0):
    toy = datasets.TOY_DATASETS[name](_config(name).data)
    return np.asarray(toy.sample(jax.random.PRNGKey(seed), n), np.float64)


@pytest.mark.parametrize("name", TOYS)
def test_batches_shape_scale_and_determinism(name):
    """Shapes and dtype; the customary scale; batch k a pure function of (seed, k); the test set apart from the
    training stream (no test point equals a point of the first 20 batches: continuous data repeat only if reused)."""
    dataset, again, other_seed = (datasets.get_dataset(_config(name, seed)) for seed in (0, 0, 1))
    batch = dataset.train_batch(7)
    assert batch.shape == (256, 2) and batch.dtype == np.float32 and np.isfinite(batch).all()
    assert dataset.test_data.shape == (512, 2) and dataset.test_data.dtype == np.float32
    assert np.isfinite(dataset.test_data).all()
    assert dataset.data_range is None and dataset.levels is None
    # Every toy lies within about ±4 (the widest noise tails stay inside ±5.5) and is not squeezed near 0.
    assert 2.0 < np.abs(dataset.test_data).max() < 5.5

    np.testing.assert_array_equal(batch, again.train_batch(7))
    np.testing.assert_array_equal(dataset.test_data, again.test_data)
    assert not np.array_equal(batch, dataset.train_batch(8))
    assert not np.array_equal(batch, other_seed.train_batch(7))
    assert not np.array_equal(dataset.test_data, other_seed.test_data)

    train = np.concatenate([dataset.train_batch(s) for s in range(20)])
    assert not {tuple(p) for p in dataset.test_data} & {tuple(p) for p in train}


def test_hosts_slices_of_a_toy_batch_make_the_one_host_batch(monkeypatch):
    """With 2 hosts each host reads its half of the global batch: a multi-host run trains on a one-host run's data."""
    whole = datasets.get_dataset(_config("checkerboard")).train_batch(5)
    monkeypatch.setattr(datasets.jax, "process_count", lambda: 2)
    halves = []
    for host in range(2):
        monkeypatch.setattr(datasets.jax, "process_index", lambda host=host: host)
        halves.append(datasets.get_dataset(_config("checkerboard")).train_batch(5))
    assert halves[0].shape == (128, 2)
    np.testing.assert_array_equal(np.concatenate(halves), whole)

def test_checkerboard_fills_exactly_the_even_squares_evenly():
    x = _sample("checkerboard")
    cell = np.floor(x / 2.0)
    assert np.all(np.abs(x) <= 4.0)
    assert np.all((cell[:, 0] + cell[:, 1]) % 2 == 0)  # exact: no sample in an odd square
    counts = np.unique(cell, axis=0, return_counts=True)[1]
    # 8 squares, 1/8 each; multinomial std of a count = sqrt(n p (1 - p)) ≈ 47: allow 5 of them.
    assert len(counts) == 8
    np.testing.assert_allclose(counts, len(x) / 8, atol=5 * np.sqrt(len(x) / 8 * 7 / 8))


def test_eight_gaussians_is_its_mixture_density():
    """The sampler is the mixture that evaluation uses: covariance (r²/2 + s²) I with r = 2√2, s = 0.5/√2."""
    toy = datasets.TOY_DATASETS["eight_gaussians"](None)
    assert isinstance(toy.density, datasets.GaussianMixture)
    x = _sample("eight_gaussians")
    expected = (8.0 / 2.0 + 0.125) * np.eye(2)
    # Sample covariance of 20k points: std of each entry ≈ sqrt(E x⁴ - var²)/sqrt(n) ≈ 0.03; allow ~4 of them.
    np.testing.assert_allclose(np.cov(x.T), expected, atol=0.12)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=4 * np.sqrt(4.125 / len(x)))
    angles = np.round(np.arctan2(x[:, 1], x[:, 0]) / (np.pi / 4)) % 8
    np.testing.assert_allclose(np.bincount(angles.astype(int)), len(x) / 8, atol=5 * np.sqrt(len(x) / 8))


def test_rings_have_four_equally_likely_radii():
    r = np.linalg.norm(_sample("rings"), axis=1)
    ring = np.clip(np.round(r / 0.75), 1, 4)
    # Radial noise has std 0.08; a point farther than 0.4 (5 std) from every ring radius would be an error.
    assert np.all(np.abs(r - 0.75 * ring) < 0.4)
    np.testing.assert_allclose(np.bincount(ring.astype(int))[1:], len(r) / 4, atol=5 * np.sqrt(len(r) / 4))


def test_two_moons_have_the_sklearn_geometry():
    """Points lie near circles of radius 2 around (-1, -0.2) (upper moon) and (1, 0.8) (lower moon)."""
    x = _sample("two_moons")
    dist = np.minimum(np.abs(np.linalg.norm(x - [-1.0, -0.2], axis=1) - 2.0),
                      np.abs(np.linalg.norm(x - [1.0, 0.8], axis=1) - 2.0))
    # Isotropic noise std 0.2 after scaling: the distance to the nearest circle is ≈ |N(0, 0.2²)|, mean 0.16.
    assert np.mean(dist) < 0.18 and np.max(dist) < 1.0
    # Mean of the two moons: 2 · (½, ¼) + (-1, -0.2) = (0, 0.3); std of the mean < 0.013 per coordinate.
    np.testing.assert_allclose(x.mean(0), [0.0, 0.3], atol=0.05)


def test_swiss_roll_spirals_out_with_its_angle():
    """Noise-free, 5 x = t (cos t, sin t): the radius grows from 1.5π to 4.5π; with N(0, 1) noise (÷5) the mean
    radius is ≈ E[t]/5 = 3π/5 ≈ 1.885 (the noise adds ≈ 1/(2 E t) ≈ 0.05 in units of 5 x)."""
    x = _sample("swiss_roll")
    r = 5.0 * np.linalg.norm(x, axis=1)
    assert abs(r.mean() - 3 * np.pi - 0.05) < 0.1
    assert np.quantile(r, 0.01) > 1.5 * np.pi - 2.5 and np.quantile(r, 0.99) < 4.5 * np.pi + 2.5


def test_gmm_dataset_is_the_configured_mixture():
    dataset = datasets.get_dataset(_config("gmm"))
    mixture = dataset.density
    np.testing.assert_allclose(mixture.weights, GMM["gmm_weights"])
    np.testing.assert_allclose(mixture.means, GMM["gmm_means"])
    np.testing.assert_allclose(mixture.covs[1], 0.64 * np.eye(2))
    # Mean of 512 test points: ≈ 0.25 (-2, 0) + 0.75 (1, 1) = (0.25, 0.75); per-coordinate std ≈ 0.07.
    np.testing.assert_allclose(dataset.test_data.mean(0), [0.25, 0.75], atol=0.3)


def test_gmm_needs_its_fields_and_a_matching_dim():
    config = _config("gmm")
    del config.data["gmm_stds"]
    with pytest.raises(ValueError, match="config.data.gmm_stds"):
        datasets.get_dataset(config)
    config = _config("gmm")
    config.data.gmm_means = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="config.data.dim = 2"):
        datasets.get_dataset(config)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'moons'") as info:
        datasets.get_dataset(_config("moons"))
    assert all(name in str(info.value) for name in TOYS)
