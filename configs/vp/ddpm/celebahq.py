"""DDPM (Ho et al. 2020) on CelebA-HQ at 256x256: the discrete objective (1000 steps), ancestral sampling.

    python main.py --config=configs/vp/ddpm/celebahq.py --workdir=runs/vp_ddpm_celebahq --mode=train

Expected: samples like those of Ho et al. 2020 on CelebA-HQ at 256x256; no score for this config is published in
the score-SDE material.
Cost: 2.4M steps at batch 64 on 256x256 images with the 111.6M-parameter DDPM U-Net of the score-SDE port (Ho et
al. 2020 report 114M: the port applies attention once per level on the upsampling path).
"""
from configs.default_lsun_configs import get_default_configs


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
    data.dataset = "CelebAHQ"
    data.image_size = 256
    data.tfrecords_path = ""              # required: --config.data.tfrecords_path=<the r08 tfrecords>
    data.centered = True                  # [-1, 1], the DDPM convention

    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.num_scales = 1000               # DDPM's 1000 steps, not the LSUN base's 2000 VE levels
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 1, 2, 2, 4, 4)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True

    config.optim.lr = 2e-5
    return config
