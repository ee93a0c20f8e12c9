"""CelebA 64x64 base (ve/celeba_ncsnpp, ve/ncsn/celeba*, ve/ncsnv2/celeba): the CIFAR-10 base with the values of the
score-SDE code's configs/default_celeba_configs.py where they differ. Deviations from the reference: see
configs/default_cifar10_configs.py.
"""
from configs.default_cifar10_configs import get_default_configs as get_cifar10_configs


def get_default_configs():
    config = get_cifar10_configs()
    config.sampling.snr = 0.17
    config.eval.begin_ckpt = 1
    config.eval.enable_sampling = True
    config.eval.num_test = 19867          # the CelebA validation split (the reference evaluates on it)
    config.data.dataset = "CELEBA"
    config.data.image_size = 64
    config.model.sigma_max = 90.0         # ≈ the largest pairwise distance of 64x64 CelebA images
    return config
