"""NCSN++ cont. on CIFAR-10 with the VP SDE.

    python main.py --config=configs/vp/cifar10_ncsnpp_continuous.py --workdir=runs/vp_cifar10_ncsnpp_continuous --mode=train

Expected: no checkpoint of this config in the score_sde_pytorch README; NCSN++ with the VP / sub-VP SDEs belongs
to the architecture study of Song et al. 2021 (Sec. 4.4 and its appendix).
Cost: 1.3M steps at batch 128; see configs/default_cifar10_configs.py for the measured time per step.
"""
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    training = config.training
    training.sde = "vpsde"
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
    model.fir = True
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "residual"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"   # labels 999 t (continuous) or the step index (discrete)
    model.fourier_scale = 16.0
    model.conv_size = 3
    return config
