"""NCSN++ on 64x64 CelebA with the discrete SMLD objective (VE, 1000 noise levels, σ_max 90).

    python main.py --config=configs/ve/celeba_ncsnpp.py --workdir=runs/ve_celeba_ncsnpp --mode=train

Expected: no published number for this exact config (the score_sde_pytorch README has no CelebA checkpoint:
Google did not release them); CelebA 64x64 was part of the architecture study of Song et al. 2021 (Sec. 4.4 and
its appendix).
Cost: 1.3M steps at batch 128 on 64x64 images (4× the pixels of CIFAR-10).
"""
from configs.default_celeba_configs import get_default_configs


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
    model.name = "ncsnpp"
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "residual"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"   # discrete levels: the labels are indices, not σ
    model.conv_size = 3
    return config
