"""The DDPM U-Net on CIFAR-10 with the sub-VP SDE, continuous time.

    python main.py --config=configs/subvp/cifar10_ddpm_continuous.py --workdir=runs/subvp_cifar10_ddpm_continuous --mode=train

Expected: probability-flow ODE sampler FID 3.56 and NLL 3.05 bits/dim on uniformly dequantized test images (last
checkpoint): Song et al. 2021, Table 2, as listed in the score_sde_pytorch README.
Cost: 1.3M steps at batch 128 with the 35.2M-parameter DDPM U-Net of the score-SDE port (Ho et al. 2020 report
35.7M: the port applies attention once per level on the upsampling path).
"""
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    training = config.training
    training.sde = "subvpsde"
    training.continuous = True
    training.reduce_mean = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"
    sampling.eps = 1e-3

    data = config.data
    data.centered = True                  # [-1, 1], the DDPM convention

    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    return config
