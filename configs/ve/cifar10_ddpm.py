"""The original DDPM U-Net trained with the discrete SMLD objective (VE, 1000 noise levels) on CIFAR-10.

    python main.py --config=configs/ve/cifar10_ddpm.py --workdir=runs/ve_cifar10_ddpm --mode=train

Expected: the reference's VE model with DDPM's architecture, for comparing samplers on the same network; its
FIDs per sampler: see Table 1 of Song et al. 2021 (no checkpoint of it in the score_sde_pytorch README).
Cost: 1.3M steps at batch 128 with the 35.2M-parameter DDPM U-Net of the score-SDE port (Ho et al. 2020 report
35.7M: the port applies attention once per level on the upsampling path).
"""
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    training = config.training
    training.sde = "vesde"
    training.continuous = False

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.eps = 1e-5

    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.conv_size = 3
    return config
