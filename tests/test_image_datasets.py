"""Embedded image datasets: shapes, scaling to the data range, levels, fixed splits, exact-resume batches."""
import ml_collections
import numpy as np
import pytest

import datasets
import likelihood

SETS = {"DIGITS": (8, 17, 1497, 300), "MNIST5K": (28, 256, 4500, 500)}


def config(name, centered=False, flip=False, dequantize=False, batch_size=64, num_test=-1):
    size = SETS[name][0]
    return ml_collections.ConfigDict(dict(
        seed=3, training=dict(batch_size=batch_size), eval=dict(num_test=num_test),
        data=dict(dataset=name, image_size=size, num_channels=1, centered=centered, random_flip=flip,
                  uniform_dequantization=dequantize)))


@pytest.mark.parametrize("name", SETS)
def test_shapes_levels_and_split_sizes(name):
    size, levels, n_train, n_test = SETS[name]
    ds = datasets.get_dataset(config(name))
    assert ds.shape == (size, size, 1) and ds.levels == levels
    assert len(ds.train_levels) == n_train and ds.test_data.shape == (n_test, size, size, 1)
    assert ds.train_levels.min() == 0 and ds.train_levels.max() == levels - 1
    # The split is fixed: no training image is a test image of the same index set (disjoint by construction).
    assert datasets.get_dataset(config(name, batch_size=8)).test_data.tobytes() == ds.test_data.tobytes()


@pytest.mark.parametrize("centered, low, high", [(False, 0.0, 1.0), (True, -1.0, 1.0)])
def test_batches_are_bin_centres_in_the_data_range(centered, low, high):
    ds = datasets.get_dataset(config("DIGITS", centered=centered))
    x = ds.train_batch(5)
    assert x.dtype == np.float32 and x.shape == (64, 8, 8, 1)
    # Without dequantization x = a (k + ½)/K + b: the bin centres, inside (low, high).
    k = (x - low) / (high - low) * 17 - 0.5
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert x.min() > low and x.max() < high


def test_dequantization_stays_in_the_bin_and_test_data_is_dequantized():
    ds = datasets.get_dataset(config("DIGITS", dequantize=True))
    x = ds.train_batch(0)
    bins = x * 17
    assert np.all(np.floor(bins) != bins)  # u ~ U[0, 1): never exactly on a bin edge here
    # Dequantized test data: each value lies within its integer's bin [k/K, (k+1)/K).
    kt = np.floor(ds.test_data * 17)
    assert kt.min() >= 0 and kt.max() <= 16 and 0.4 < float((ds.test_data * 17 - kt).mean()) < 0.6
    # bits/dim of a model uniform on [0, 1]^D is log2(17) for this data (SPEC §4).
    bpd = likelihood.bits_per_dim(np.zeros(2), ds.shape, ds.data_range, ds.levels)
    np.testing.assert_allclose(bpd, np.log2(17), rtol=1e-6)


def test_batches_are_a_pure_function_of_step_and_cover_each_epoch_once():
    ds = datasets.get_dataset(config("DIGITS", batch_size=1497))   # one batch = one epoch
    again = datasets.get_dataset(config("DIGITS", batch_size=1497))
    np.testing.assert_array_equal(ds.train_batch(3), again.train_batch(3))
    assert not np.array_equal(ds.train_batch(3), ds.train_batch(4))
    # An epoch is a permutation of the training set.
    epoch = np.sort(ds.train_batch(2).reshape(1497, -1), axis=0)
    whole = np.sort(ds.to_float(ds.train_levels, 0.5).reshape(1497, -1), axis=0)
    np.testing.assert_array_equal(epoch, whole)


def test_flips_mirror_horizontally_only():
    plain = datasets.get_dataset(config("MNIST5K", batch_size=32))
    flipped = datasets.get_dataset(config("MNIST5K", batch_size=32, flip=True))
    a, b = plain.train_batch(1), flipped.train_batch(1)
    same = np.all(a == b, axis=(1, 2, 3))
    mirrored = np.all(a[:, :, ::-1] == b, axis=(1, 2, 3))
    assert np.all(same | mirrored) and mirrored.sum() > 5 and same.sum() > 5


def test_wrong_image_size_and_unknown_name_say_what_to_set():
    c = config("MNIST5K")
    c.data.image_size = 32
    with pytest.raises(ValueError, match="config.data.image_size = 28"):
        datasets.get_dataset(c)
    c.data.dataset = "NOPE"
    with pytest.raises(ValueError, match="MNIST5K"):
        datasets.get_dataset(c)
