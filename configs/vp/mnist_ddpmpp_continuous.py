"""A small DDPM++ cont. on 28x28 MNIST with the VP SDE: the image pipeline on the embedded grey-scale digits.

    python main.py --config=configs/vp/mnist_ddpmpp_continuous.py --workdir=runs/vp_mnist_ddpmpp_continuous --mode=train

Expected: no published reference for this config (the score-SDE paper has no MNIST experiment); judge it by its
sample grids and by --mode=eval with --config.eval.enable_bpd=True (bits/dim on the test digits).
Cost: 50k steps at batch 128 of a 3-level, nf 64 network on 28x28x1 images; not yet timed.
"""
from configs.default_mnist_configs import get_default_configs


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
    model.ema_rate = 0.999                # a 1000-step horizon suits a 50k-step run
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 64
    model.ch_mult = (1, 2, 2)             # 28 -> 14 -> 7
    model.num_res_blocks = 2
    model.attn_resolutions = (14,)
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
    model.embedding_type = "positional"   # labels 999 t
    model.fourier_scale = 16.0
    model.conv_size = 3
    return config
