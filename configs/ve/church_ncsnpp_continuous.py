"""NCSN++ cont. on LSUN church_outdoor with the VE SDE, continuous time; input and output image pyramids.

    python main.py --config=configs/ve/church_ncsnpp_continuous.py --workdir=runs/ve_church_ncsnpp_continuous --mode=train

Expected: samples like those of the ve/church_ncsnpp_continuous checkpoint in the score_sde_pytorch README,
which lists no FID for it.
Cost: 2.4M steps at batch 64 on 256x256 images; the hardware time is not published.
"""
from configs.default_lsun_configs import get_default_configs


def get_config():
    config = get_default_configs()
    training = config.training
    training.sde = "vesde"
    training.continuous = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.eps = 1e-5

    data = config.data
    data.category = "church_outdoor"

    model = config.model
    model.name = "ncsnpp"
    model.sigma_max = 380.0               # ≈ the largest pairwise distance of the training images
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "output_skip"
    model.progressive_input = "input_skip"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.fourier_scale = 16.0
    model.conv_size = 3
    return config
