"""NCSNv2 (Song & Ermon 2020) on 128x128 LSUN bedroom: all five techniques, 1086 noise levels from σ_max 190.

    python main.py --config=configs/ve/ncsnv2/bedroom.py --workdir=runs/ncsnv2_bedroom --mode=train

Expected: samples like the LSUN bedroom samples of Song & Ermon 2020 (arXiv:2006.09011).
Cost: 2.4M steps at batch 128 on 128x128 images; the hardware time is not published.
"""
from configs.default_lsun_configs import get_default_configs


def get_config():
    config = get_default_configs()
    training = config.training
    training.sde = "vesde"
    training.continuous = False
    training.batch_size = 128

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "none"
    sampling.corrector = "ald"            # annealed Langevin dynamics (SPEC §6)
    sampling.n_steps_each = 3
    sampling.snr = 0.095
    sampling.step_lr = 1.8e-6             # ε of method "ald" = 2 (snr σ_min)²: the corrector's steps
    sampling.eps = 1e-5

    data = config.data
    data.category = "bedroom"
    data.image_size = 128

    model = config.model
    model.name = "ncsnv2_128"
    model.scale_by_sigma = True           # technique 3: an unconditional network whose output is divided by σ
    model.sigma_max = 190.0
    model.num_scales = 1086
    model.ema_rate = 0.9999
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.nf = 128
    model.interpolation = "bilinear"

    optim = config.optim
    optim.lr = 1e-4
    optim.warmup = 0
    optim.grad_clip = -1.0                # no clipping
    return config
