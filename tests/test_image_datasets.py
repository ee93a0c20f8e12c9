"""Embedded image datasets: shapes, scaling to the data range, levels, fixed splits, exact-resume batches."""
import ml_collections
import numpy as np
import pytest

import datasets
import likelihood

# name -> (image size, channels, levels, train images, test images)
SETS = {"DIGITS": (8, 1, 17, 1497, 300), "MNIST5K": (28, 1, 256, 4500, 500), "COLOUR_MNIST5K": (28, 3, 256, 4500, 500),
        "PHOTO_PATCHES": (32, 3, 256, 5200, 400)}


def config(name, centered=False, flip=False, dequantize=False, batch_size=64, num_test=-1):
    size, channels = SETS[name][:2]
    return ml_collections.ConfigDict(dict(
        seed=3, training=dict(batch_size=batch_size), eval=dict(num_test=num_test),
        data=dict(dataset=name, image_size=size, num_channels=channels, centered=centered, random_flip=flip,
                  uniform_dequantization=dequantize)))


@pytest.mark.parametrize("name", SETS)
def test_shapes_levels_and_split_sizes(name):
    size, channels, levels, n_train, n_test = SETS[name]
    ds = datasets.get_dataset(config(name))
    assert ds.shape == (size, size, channels) and ds.levels == levels
    assert len(ds.train_levels) == n_train and ds.test_data.shape == (n_test, size, size, channels)
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


def test_photo_patches_are_windows_of_the_photos_and_the_split_shares_no_pixel():
    """Every patch is a 32x32 window of one of scikit-learn's photos; test windows lie in the last 32 columns of each
    160-column block, training windows left of them: their column ranges never meet."""
    from sklearn.datasets import load_sample_images

    train, test, _ = datasets.IMAGE_DATASETS["PHOTO_PATCHES"]()
    china = load_sample_images().images[0]
    np.testing.assert_array_equal(train[0], china[:32, :32])
    np.testing.assert_array_equal(test[0], china[:32, 128:160])
    np.testing.assert_array_equal(train[1], china[:32, 8:40])
    assert len(np.unique(train.reshape(len(train), -1), axis=0)) == len(train)


def test_repeats_of_the_test_split_redraw_only_the_dequantization():
    """Repeat 0 is test_data; repeat r > 0 holds the same integer images k with fresh u (the repeats of a bits/dim
    evaluation), the same draw every time it is asked for."""
    ds = datasets.get_dataset(config("DIGITS"))
    assert ds.test_split(0) is ds.test_data
    first, again = ds.test_split(1), ds.test_split(1)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(np.floor(first * 17), np.floor(ds.test_data * 17))
    assert np.mean(first != ds.test_data) > 0.99 and not np.array_equal(first, ds.test_split(2))


def test_the_sample_quality_reference_is_the_whole_test_split_at_bin_centres():
    ds = datasets.get_dataset(config("DIGITS", num_test=8))
    reference = ds.reference_data()
    assert len(ds.test_data) == 8 and reference.shape == (300, 8, 8, 1)
    k = np.floor(reference * 17)
    np.testing.assert_allclose(reference, (k + 0.5) / 17, atol=1e-7)
    np.testing.assert_array_equal(k[:8], np.floor(ds.test_data * 17))


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


class CodedImages:
    """A random-access source of n virtual 2x2x3 images whose pixels spell their own index (base 256 over the
    channels); it logs every request, as a stand-in for a dataset too big for memory."""

    def __init__(self, n):
        self.n, self.requests = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, indices):
        indices = np.asarray(indices)
        self.requests.append(indices)
        digits = np.stack([indices % 256, indices // 256 % 256, indices // 65536], axis=-1).astype(np.uint8)
        return np.broadcast_to(digits[:, None, None, :], (len(indices), 2, 2, 3))


def test_any_random_access_source_is_read_a_batch_at_a_time():
    data = ml_collections.ConfigDict(dict(centered=False, uniform_dequantization=False, random_flip=False))
    train, test = CodedImages(300_000), CodedImages(1000)
    ds = datasets.ImageDataset(train, test, 256, data, seed=3, batch_size=16, num_test=40)
    # test_data: the first 40 test images, asked for once.
    assert [list(r) for r in test.requests] == [list(range(40))] and ds.test_data.shape == (40, 2, 2, 3)
    for step in range(3):
        batch = ds.train_batch(step)
        index = np.round(batch[:, 0, 0] * 256 - 0.5).astype(np.int64) @ np.array([1, 256, 65536])
        # The batch is the images of the indices asked for (the first request of this step, prefetched or not).
        np.testing.assert_array_equal(index, train.requests[step])
    # Only batches were fetched: one request of 16 per step (step 3's may be under way in the background), distinct
    # indices within the epoch.
    requests = list(train.requests)
    assert len(requests) in (3, 4) and all(len(r) == 16 for r in requests)
    assert len(np.unique(np.concatenate(requests))) == 16 * len(requests)


@pytest.mark.parametrize("flip,dequantize", [(False, False), (True, True)])
def test_hosts_slices_of_a_batch_make_the_one_host_batch(monkeypatch, flip, dequantize):
    """With 2 hosts each host reads its half of the global batch, flips and noise included: a multi-host run sees
    the batches of a one-host run (same seed, same global batch size)."""
    whole = datasets.get_dataset(config("MNIST5K", flip=flip, dequantize=dequantize, batch_size=32)).train_batch(7)
    monkeypatch.setattr(datasets.jax, "process_count", lambda: 2)
    halves = []
    for host in range(2):
        monkeypatch.setattr(datasets.jax, "process_index", lambda host=host: host)
        halves.append(datasets.get_dataset(config("MNIST5K", flip=flip, dequantize=dequantize,
                                                  batch_size=32)).train_batch(7))
    assert halves[0].shape == (16, 28, 28, 1)
    np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_coloured_digits_are_the_digits_in_one_palette_hue_each():
    """Every coloured digit is its MNIST5K digit times one DIGIT_COLOURS hue (to the rounding, ±0.5 level), and
    all six hues occur."""
    grey, colour = (datasets.get_dataset(config(name, num_test=-1)) for name in ("MNIST5K", "COLOUR_MNIST5K"))
    for k_grey, k_colour in ((grey.train_levels, colour.train_levels), (grey.test_levels, colour.test_levels)):
        brightest = k_colour.reshape(len(k_colour), -1, 3)[np.arange(len(k_colour)),
                                                          k_grey.reshape(len(k_grey), -1).argmax(1)]
        hue = np.argmin(np.abs(brightest[:, None, :] - datasets.DIGIT_COLOURS[None]).sum(-1), axis=1)
        want = k_grey / 255.0 * datasets.DIGIT_COLOURS[hue][:, None, None, :]
        assert np.abs(k_colour - want).max() <= 0.5 + 1e-9
        assert set(hue) == set(range(len(datasets.DIGIT_COLOURS)))
