"""DDPM (Ho et al. 2020) on CIFAR-10 as published: the discrete objective (1000 steps), ancestral sampling.

    python main.py --config=configs/vp/ddpm/cifar10.py --workdir=runs/vp_ddpm_cifar10 --mode=train

Expected: FID 3.24 (50k samples, best checkpoint); probability-flow ODE sampler FID 3.37 and NLL 3.28 bits/dim
on uniformly dequantized test images (last checkpoint): Song et al. 2021, Tables 2 and 3, as listed in the
score_sde_pytorch README (its checkpoint vp/cifar10_ddpm).
Cost: 1.3M steps at batch 128 with the 35.2M-parameter DDPM U-Net of the score-SDE port (Ho et al. 2020 report
35.7M: the port applies attention once per level on the upsampling path).
"""
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    training = config.training
    training.sde = "vpsde"
    training.continuous = False
    training.reduce_mean = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "ancestral"
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
