"""Prepares an image set of tensorflow-datasets once, in the array_record format that datasets.py reads.

    python scripts/prepare_dataset.py --dataset=cifar10 --data_dir=/data/tensorflow_datasets

then train with --config.data.tfds_data_dir=/data/tensorflow_datasets (or leave --data_dir and that field unset
for tfds's default, $TFDS_DATA_DIR or ~/tensorflow_datasets). --dataset is the tensorflow-datasets name of a
config.data.dataset (datasets.TFDS_DATASETS):

    CIFAR10 cifar10             SVHN svhn_cropped       MNIST mnist         FASHION_MNIST fashion_mnist
    CELEBA celeb_a              LSUN lsun/<config.data.category>, e.g. lsun/church_outdoor, lsun/bedroom
    IMAGENET32 downsampled_imagenet/32x32               IMAGENET64 downsampled_imagenet/64x64

Unlike training, this step needs internet access (tfds downloads the source files) and TensorFlow: in
tensorflow-datasets 4.9 the builders of all these sets call TensorFlow while they prepare (tf.io.gfile to read the
downloads and archives, tf.image.encode_png to store array images), and LSUN's also needs tensorflow-io to read its
LMDB files. They may be installed in another environment with the same tensorflow-datasets version (see
requirements.txt): the prepared files are read without TensorFlow. --manual_dir is where tfds looks for source
files downloaded by hand. The script prints the directory it wrote.
"""
import argparse
import importlib.util
import os
import sys

# The modules that a builder's download_and_prepare imports besides tensorflow-datasets (read in its 4.9.10 code),
# by the builder name before any "/config"; builders not listed are not checked.
REQUIREMENTS = {name: ("tensorflow",) for name in (
    "cifar10", "svhn_cropped", "mnist", "fashion_mnist", "celeb_a", "downsampled_imagenet")}
REQUIREMENTS["lsun"] = ("tensorflow", "tensorflow_io")
PIP_NAMES = {"tensorflow": "tensorflow", "tensorflow_io": "tensorflow-io"}


def missing_requirements(name):
    """The modules that preparing tfds dataset `name` needs and this environment lacks."""
    return [m for m in REQUIREMENTS.get(name.split("/")[0], ()) if importlib.util.find_spec(m) is None]


def prepare(name, data_dir=None, manual_dir=None):
    """Downloads tfds dataset `name` and writes it as array_record under data_dir; returns the directory written.

    Raises ValueError, before any download, when a module the builder needs is missing.
    """
    import tensorflow_datasets as tfds

    missing = missing_requirements(name)
    if missing:
        install = " ".join(PIP_NAMES[m] for m in missing)
        raise ValueError(f"preparing {name} needs {' and '.join(missing)} (its tensorflow-datasets builder uses "
                         f"them; training does not): pip install {install}, here or in another environment with "
                         f"tensorflow-datasets=={tfds.__version__} and internet access")
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return os.fspath(builder.data_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="tensorflow-datasets name, e.g. cifar10, lsun/bedroom")
    parser.add_argument("--data_dir", default=None, help="where to write (default: $TFDS_DATA_DIR or "
                                                          "~/tensorflow_datasets); config.data.tfds_data_dir")
    parser.add_argument("--manual_dir", default=None, help="source files downloaded by hand, if any")
    args = parser.parse_args(argv)
    data_dir = os.path.expanduser(args.data_dir) if args.data_dir else None
    try:
        path = prepare(args.dataset, data_dir, args.manual_dir)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"prepared {args.dataset} as array_record in {path}")
    if data_dir:
        print(f"train with --config.data.tfds_data_dir={data_dir}")


if __name__ == "__main__":
    main()
