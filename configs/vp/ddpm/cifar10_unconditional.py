"""The DDPM U-Net on CIFAR-10 without time conditioning (conditional False; cf. technique 3 of Song & Ermon 2020),
discrete DDPM objective.

    python main.py --config=configs/vp/ddpm/cifar10_unconditional.py --workdir=runs/vp_ddpm_cifar10_unconditional --mode=train

Expected: no published number for this config; compare its FID with vp/ddpm/cifar10 to measure what the time
conditioning buys.
Cost: 1.3M steps at batch 128.
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
    model.conditional = False
    return config
