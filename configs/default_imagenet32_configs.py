"""ImageNet 32x32 base (vp/ and subvp/imagenet32_ddpmpp*_likelihood, the seed-001 experiments): the CIFAR-10 base
with the values of score_flow's configs/default_imagenet32_configs.py (yang-song/score_flow) where they differ
from its CIFAR-10 base. Deviations from the reference: see configs/default_cifar10_configs.py.

The data are tensorflow-datasets' downsampled_imagenet/32x32 (van den Oord et al. 2016; about 1.28M train and
50k validation images), score_flow's "ImageNet" at image_size 32, with the validation split as the test set.
Prepare it once with `python scripts/prepare_dataset.py --dataset=downsampled_imagenet/32x32`.
"""
from configs.default_cifar10_configs import get_default_configs as get_cifar10_configs


def get_default_configs():
    return to_imagenet32(get_cifar10_configs())


def to_imagenet32(config):
    """config (a CIFAR-10 experiment) on ImageNet 32x32 with score_flow's ImageNet settings, in place."""
    config.eval.num_test = 50000          # the whole validation split (fewer if it has fewer)
    config.eval.bpd_repeats = 1           # score_flow's eval.num_repeats: one pass (CIFAR-10: 5)
    config.data.dataset = "IMAGENET32"
    config.data.random_flip = False       # no augmentation (score_flow's ImageNet base)
    config.model.dropout = 0.0            # ~1.28M images overfit far less than CIFAR-10's 50k
    return config
