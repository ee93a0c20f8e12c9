"""DDPM++ on CIFAR-10 with the discrete DDPM objective (VP, 1000 steps; the network sees the step index).

    python main.py --config=configs/vp/cifar10_ddpmpp.py --workdir=runs/vp_cifar10_ddpmpp --mode=train

Expected: FID 2.78, IS 9.64 (50k samples, best checkpoint): Song et al. 2021, Table 3, as listed in the
score_sde_pytorch README.
Cost: 1.3M steps at batch 128; see configs/default_cifar10_configs.py for the measured time per step.
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
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"   # labels 999 t (continuous) or the step index (discrete)
    model.fourier_scale = 16.0
    model.conv_size = 3
    return config
