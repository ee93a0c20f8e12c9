"""256x256 base: LSUN church / bedroom, and CelebA-HQ and FFHQ (which the score-SDE code also builds on this base,
or at 1024x1024 on its values). The CIFAR-10 base with the values of the score-SDE code's
configs/default_lsun_configs.py where they differ; deviations from the reference: see
configs/default_cifar10_configs.py.

Experiments set data.category ("church_outdoor" | "bedroom") for LSUN; CelebA-HQ and FFHQ are not in
tensorflow-datasets, so their experiments read data.tfrecords_path (set it on the command line, e.g.
--config.data.tfrecords_path=/data/ffhq/ffhq-r08.tfrecords; the reference used the ProGAN-style tfrecords, r08 for
256x256 and r10 for 1024x1024).
"""
from configs.default_cifar10_configs import get_default_configs as get_cifar10_configs


def get_default_configs():
    config = get_cifar10_configs()
    training = config.training
    training.batch_size = 64
    training.n_iters = 2400001            # 2.4M steps
    training.snapshot_freq_for_preemption = 5000
    training.max_to_keep = 50             # ≥ the 48 permanent checkpoints

    config.sampling.snr = 0.075

    evaluate = config.eval
    # The reference's 50..96 name checkpoints a 2.4M-step run never writes at snapshot_freq 50k (it writes 1..48),
    # and its eval waits for them; 25..48 sweeps the same second half of training.
    evaluate.begin_ckpt = 25
    evaluate.end_ckpt = 48
    evaluate.batch_size = 512
    evaluate.enable_sampling = True
    evaluate.num_test = 300               # an LSUN validation split has 300 images per category

    data = config.data
    data.dataset = "LSUN"
    data.image_size = 256

    model = config.model
    model.sigma_max = 378.0               # ≈ the largest pairwise distance of 256x256 LSUN images
    model.num_scales = 2000
    model.dropout = 0.0
    return config
