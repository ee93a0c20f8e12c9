"""tensorflow-datasets image sets read without TensorFlow, and the idx files of Debian's Fashion-MNIST.

Two kinds of tfds data: tfds.testing.mock_data (it patches tfds.data_source; `as_data_source_fn` serves images
whose preprocessed result is known) with a dataset_info.json marker in a tmp data_dir, since datasets.py checks
the prepared directory before it calls tfds; and a real dataset, prepared by scripts/prepare_dataset.py from a
tiny tfds builder defined here (no download, no TensorFlow) and read back from its array_record files.
"""
import contextlib
import gzip
import importlib.util
import io
import json
import pathlib
import sys
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.data_sources import array_record

import datasets

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_dataset", ROOT / "scripts" / "prepare_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_dataset = _load_script()


def _config(name, data_dir, size, channels=3, batch_size=8, num_test=-1, centered=False, flip=False,
            dequantize=False, **data):
    return ml_collections.ConfigDict(dict(
        seed=5, training=dict(batch_size=batch_size), eval=dict(num_test=num_test),
        data=dict(dataset=name, image_size=size, num_channels=channels, centered=centered, random_flip=flip,
                  uniform_dequantization=dequantize, tfds_data_dir=str(data_dir), **data)))


def _mark_prepared(data_dir, tfds_name, file_format="array_record"):
    """The file check_prepared looks for; under mock_data the records themselves come from the mock."""
    version = data_dir / tfds_name / "1.0.0"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text(json.dumps({"fileFormat": file_format}))


@contextlib.contextmanager
def _mock_tfds(splits):
    """tfds.data_source serves the uint8 images of `splits` {split: [n, H, W, C]}; yields the (full name, split)
    pairs that tfds was asked for."""
    calls = []

    def as_data_source(builder, split, **kwargs):
        calls.append((builder.info.full_name, split))
        return [{"image": image} for image in splits[split]]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        yield calls


def _levels(x, low, high, levels=256):
    """The integer level k of bin-centre data x = (high - low)(k + ½)/K + low."""
    k = (x - low) / (high - low) * levels - 0.5
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # bin centres: float32 rounding only
    return np.round(k).astype(np.int64)


def _random_images(n, shape, seed):
    return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


# --- Mocked tfds sets: shapes, scaling, the splits asked for, the reference's preprocessing, exact resume. ---

@pytest.mark.parametrize("centered, low, high", [(False, 0.0, 1.0), (True, -1.0, 1.0)])
def test_cifar10_shapes_scaling_and_splits(tmp_path, centered, low, high):
    train, test = _random_images(24, (32, 32, 3), 0), _random_images(10, (32, 32, 3), 1)
    _mark_prepared(tmp_path, "cifar10")
    with _mock_tfds({"train": train, "test": test}) as calls:
        ds = datasets.get_dataset(_config("CIFAR10", tmp_path, 32, num_test=6, centered=centered))
        batches = [ds.train_batch(step) for step in range(3)]  # 3 x 8 = one epoch of 24
    assert {(name.split("/")[0], split) for name, split in calls} == {("cifar10", "train"), ("cifar10", "test")}
    assert ds.levels == 256 and ds.data_range == (low, high) and ds.shape == (32, 32, 3) and ds.density is None
    assert batches[0].shape == (8, 32, 32, 3) and batches[0].dtype == np.float32
    # An epoch holds every training image once, each as its bin centres (no flips, no dequantization).
    epoch = _levels(np.concatenate(batches), low, high)
    assert sorted(map(bytes, epoch.astype(np.uint8))) == sorted(map(bytes, train))
    # test_data: the first 6 test images in order, dequantized once: each value inside its integer's bin.
    assert ds.test_data.shape == (6, 32, 32, 3) and ds.test_data.dtype == np.float32
    np.testing.assert_array_equal(np.floor((ds.test_data - low) / (high - low) * 256), test[:6])


@pytest.mark.parametrize("size, row, expected", [
    (16, 8 * np.arange(32) + 4, 16 * np.arange(16) + 8),
    (8, 255 * (np.arange(32) % 4 == 0), np.full(8, 64)),
])
def test_resize_to_image_size_is_antialiased_bilinear(tmp_path, size, row, expected):
    """32 -> size with the antialiased bilinear filter of the reference's tf.image.resize, on images constant down
    the columns: a linear ramp 8c + 4 becomes 16j + 8, its value at the output pixel centres 2j + ½; the pattern
    255, 0, 0, 0 becomes its mean 63.75 -> 64, where point-sampling bilinear interpolation would give 0."""
    image = np.broadcast_to(row[None, :, None], (32, 32, 3)).astype(np.uint8)
    _mark_prepared(tmp_path, "svhn_cropped")
    with _mock_tfds({"train": image[None], "test": image[None]}):
        ds = datasets.get_dataset(_config("SVHN", tmp_path, size, batch_size=2))
    k = _levels(ds.train_batch(0), 0.0, 1.0)
    assert k.shape == (2, size, size, 3)
    # Interior columns (the edge ones average over a clipped support); exact up to Pillow's fixed-point rounding.
    np.testing.assert_array_equal(k[:, :, 1:-1], np.broadcast_to(expected[1:-1, None], (2, size, size - 2, 3)))


def test_grey_images_keep_one_channel(tmp_path):
    """MNIST at 14x14: each constant 28x28x1 image (value 10 i) stays constant through the resize."""
    images = np.broadcast_to((10 * np.arange(8, dtype=np.uint8))[:, None, None, None], (8, 28, 28, 1))
    _mark_prepared(tmp_path, "mnist")
    with _mock_tfds({"train": images, "test": images}):
        ds = datasets.get_dataset(_config("MNIST", tmp_path, 14, channels=1))
    k = _levels(ds.train_batch(0), 0.0, 1.0)
    assert k.shape == (8, 14, 14, 1) and ds.test_data.shape == (8, 14, 14, 1)
    assert sorted(k[:, 0, 0, 0]) == list(range(0, 80, 10)) and np.all(k == k[:, :1, :1])


def test_celeba_crops_the_central_140_window_then_resizes(tmp_path):
    """A 218x178 image whose central 140x140 window (rows 39..178, columns 19..158) holds a row ramp 60 + r - 39
    (+20 per channel) and zeros elsewhere: at 64x64 every output row i shows the ramp at the input row
    (i + ½)·140/64 - ½ of the window, and no zero of the border leaks in."""
    image = np.zeros((218, 178, 3), np.uint8)
    ramp = 60 + np.arange(140)[:, None, None] + 20 * np.arange(3)
    image[39:179, 19:159] = np.broadcast_to(ramp, (140, 140, 3))
    _mark_prepared(tmp_path, "celeb_a")
    with _mock_tfds({"train": image[None], "validation": image[None]}) as calls:
        ds = datasets.get_dataset(_config("CELEBA", tmp_path, 64, batch_size=1))
    assert {split for _, split in calls} == {"train", "validation"}  # the reference's evaluation split
    k = _levels(ds.train_batch(0), 0.0, 1.0)[0]
    assert k.shape == (64, 64, 3)
    rows = 60 + (np.arange(64) + 0.5) * 140 / 64 - 0.5
    expected = rows[:, None, None] + 20 * np.arange(3)
    # Interior rows: the ramp, within the rounding to integers (½ level).
    assert np.abs(k[2:-2] - expected[2:-2]).max() <= 0.5 + 1e-9
    # Edge rows and columns too: a window misplaced by one pixel would average zeros into them (values < 60).
    assert (k - 20 * np.arange(3)).min() >= 60


@pytest.mark.parametrize("size, width", [(128, 384), (256, 400)])
def test_lsun_takes_the_central_square(tmp_path, size, width):
    """Landscape images with a constant 180 around the central square and zeros at the sides. At 128 (shorter side
    resized, then the centre cropped) the constant band is 8 input pixels wider than the square, the filter's
    reach; at 256 (the square cropped, then bicubic-resized) it is exactly the square. Any other crop shows zeros."""
    height = 256 if size == 128 else 300
    margin = 8 if size == 128 else 0
    left = (width - height) // 2 - margin
    image = np.zeros((height, width, 3), np.uint8)
    image[:, left:width - left] = 180
    _mark_prepared(tmp_path, "lsun/church_outdoor")
    with _mock_tfds({"train": image[None], "validation": image[None]}) as calls:
        ds = datasets.get_dataset(_config("LSUN", tmp_path, size, batch_size=1, category="church_outdoor"))
    assert {name.rsplit("/", 1)[0] for name, _ in calls} == {"lsun/church_outdoor"}
    k = _levels(ds.train_batch(0), 0.0, 1.0)
    assert k.shape == (1, size, size, 3) and k.min() == k.max() == 180


def test_lsun_needs_a_category(tmp_path):
    with pytest.raises(ValueError, match="config.data.category"):
        datasets.get_dataset(_config("LSUN", tmp_path, 256))


def test_batches_are_a_pure_function_of_the_step(tmp_path):
    """Two dataset objects (a resumed run) give the same batch for each step, whatever order the steps are asked
    in (the prefetched next batch is the same batch); flips and dequantization noise depend on the step."""
    train = _random_images(20, (8, 8, 3), 2)
    _mark_prepared(tmp_path, "cifar10")
    config = _config("CIFAR10", tmp_path, 8, batch_size=6, flip=True, dequantize=True)
    with _mock_tfds({"train": train, "test": train[:4]}):
        first, resumed = datasets.get_dataset(config), datasets.get_dataset(config)
        forward = [first.train_batch(step) for step in range(5)]
        backward = [resumed.train_batch(step) for step in (4, 3, 2, 1, 0)][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(forward[0], forward[1])
    np.testing.assert_array_equal(first.test_data, resumed.test_data)


def test_wrong_channels_and_unsupported_sets_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="config.data.num_channels = 1"):
        datasets.get_dataset(_config("MNIST", tmp_path, 28, channels=3))
    for name in ("CelebAHQ", "FFHQ"):
        with pytest.raises(ValueError, match=f"dataset {name} is not supported by this reader yet.*TFDS_DATASETS"):
            datasets.get_dataset(_config(name, tmp_path, 256))


# --- Failing fast when the data is not prepared. ---

@pytest.mark.parametrize("name, tfds_name, extra", [("CIFAR10", "cifar10", {}),
                                                    ("LSUN", "lsun/bedroom", {"category": "bedroom"})])
def test_unprepared_data_fails_fast_with_the_prepare_command(tmp_path, monkeypatch, name, tfds_name, extra):
    def no_tfds(*args, **kwargs):
        raise AssertionError("tfds.data_source was called for a dataset that is not prepared")

    monkeypatch.setattr(tfds, "data_source", no_tfds)
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        datasets.get_dataset(_config(name, tmp_path, 32, **extra))
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, elapsed  # the brief's bound; measured ~1 ms (one glob of the data_dir)
    assert f"python scripts/prepare_dataset.py --dataset={tfds_name} --data_dir={tmp_path}" in str(error.value)
    assert "TensorFlow" in str(error.value)


def test_data_prepared_as_tfrecord_is_refused(tmp_path):
    _mark_prepared(tmp_path, "cifar10", file_format="tfrecord")
    with pytest.raises(ValueError, match="array_record format; prepare it again"):
        datasets.get_dataset(_config("CIFAR10", tmp_path, 32))


# --- A real prepared dataset: prepare_dataset.prepare writes array_record files, datasets.py reads them. ---

class ScoreSdeTestImages(tfds.core.GeneratorBasedBuilder):
    """12 train / 5 test random 8x8 RGB PNG images: a real tfds builder that downloads nothing and needs no
    TensorFlow (it hands tfds encoded bytes)."""

    VERSION = tfds.core.Version("1.0.0")
    IMAGES = {"train": _random_images(12, (8, 8, 3), 3), "test": _random_images(5, (8, 8, 3), 4)}

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(None, None, 3))}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.IMAGES}

    def _generate_examples(self, split):
        for i, image in enumerate(self.IMAGES[split]):
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            yield i, {"image": png.getvalue()}


def test_prepared_array_record_files_are_read_without_tensorflow(tmp_path, monkeypatch):
    path = pathlib.Path(prepare_dataset.prepare("score_sde_test_images", str(tmp_path)))
    assert path == tmp_path / "score_sde_test_images" / "1.0.0"
    assert json.loads((path / "dataset_info.json").read_text())["fileFormat"] == "array_record"
    monkeypatch.setitem(datasets.TFDS_DATASETS, "TEST_IMAGES", datasets.TfdsImageSet("score_sde_test_images",
                                                                                     "test", 3))
    ds = datasets.get_dataset(_config("TEST_IMAGES", tmp_path, 8, batch_size=4))
    assert isinstance(ds.train_levels.records, array_record.ArrayRecordDataSource)
    epoch = _levels(np.concatenate([ds.train_batch(step) for step in range(3)]), 0.0, 1.0).astype(np.uint8)
    # tfds stores the records in its own shuffled order: compare the sets of images, exactly (PNG is lossless).
    images = ScoreSdeTestImages.IMAGES
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, images["train"]))
    test = np.floor(ds.test_data * 256).astype(np.uint8)
    assert sorted(map(bytes, test)) == sorted(map(bytes, images["test"]))
    assert "tensorflow" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed here")
def test_prepare_script_says_that_tensorflow_is_needed(tmp_path, capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit, match="pip install tensorflow"):
        prepare_dataset.main(["--dataset=cifar10", f"--data_dir={tmp_path}"])
    assert time.perf_counter() - start < 5.0  # refused before any download
    assert list(tmp_path.iterdir()) == []


# --- idx files and the Fashion-MNIST of the Debian package. ---

def _write_idx(path, array, type_code):
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(data)


@pytest.mark.parametrize("filename, array, type_code", [
    ("images.idx3.gz", np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08),
    ("values.idx2", np.array([[-70000, 1], [2, 2**31 - 1]], np.int32), 0x0C),
    ("values.idx1", np.array([0.5, -1e300, np.pi]), 0x0E),
])
def test_read_idx_round_trips_big_endian_files(tmp_path, filename, array, type_code):
    _write_idx(tmp_path / filename, array, type_code)
    parsed = datasets.read_idx(str(tmp_path / filename))
    assert parsed.dtype == array.dtype and parsed.shape == array.shape
    np.testing.assert_array_equal(parsed, array)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "text").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="not an idx file"):
        datasets.read_idx(str(tmp_path / "text"))
    _write_idx(tmp_path / "short", np.zeros((3, 2), np.uint8), 0x08)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header announces"):
        datasets.read_idx(str(tmp_path / "short"))


def test_missing_fashion_mnist_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        datasets.get_dataset(_config("FASHION_MNIST_DEBIAN", tmp_path, 28, channels=1))


@pytest.mark.skipif(not pathlib.Path(datasets.FASHION_MNIST_DIR).is_dir(),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_debian_has_the_official_split():
    ds = datasets.get_dataset(_config("FASHION_MNIST_DEBIAN", "unused", 28, channels=1, batch_size=100,
                                      num_test=10000))
    assert len(ds.train_levels) == 60000 and ds.train_levels.shape == (60000, 28, 28, 1) and ds.levels == 256
    assert ds.test_data.shape == (10000, 28, 28, 1) and ds.shape == (28, 28, 1)
    # The test split in file order: the first test image is t10k's first.
    first = datasets.read_idx(f"{datasets.FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz")[0]
    np.testing.assert_array_equal(np.floor(ds.test_data[0, ..., 0] * 256), first)
    # The per-pixel mean and std of the training images as [0, 1] values, 0.2860 and 0.3530 as commonly published
    # (4 decimals, hence ±5e-5; measured 0.28604 and 0.35302).
    levels = ds.train_levels
    assert abs(levels.mean(dtype=np.float64) / 255 - 0.2860) < 5e-5
    assert abs(levels.std(dtype=np.float64) / 255 - 0.3530) < 5e-5
