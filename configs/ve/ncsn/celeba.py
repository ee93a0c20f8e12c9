"""NCSN (Song & Ermon 2019) on 64x64 CelebA: 10 noise levels from σ_max 1 to 0.01, annealed Langevin with 100 steps
per level, no EMA.

    python main.py --config=configs/ve/ncsn/celeba.py --workdir=runs/ncsn_celeba --mode=train

Expected: samples like the CelebA samples of Song & Ermon 2019; no score for this config is published in the
score-SDE material.
Cost: 1.3M steps at batch 128 on 64x64 images (the CelebA base); the hardware time is not published.
"""
from configs.default_celeba_configs import get_default_configs


def get_config():
    config = get_default_configs()
    training = config.training
    training.sde = "vesde"
    training.continuous = False

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "none"
    sampling.corrector = "ald"            # annealed Langevin dynamics (SPEC §6)
    sampling.n_steps_each = 100
    sampling.snr = 0.316
    sampling.step_lr = 2e-5               # ε of method "ald" = 2 (snr σ_min)²: the corrector's steps
    sampling.eps = 1e-5

    model = config.model
    model.name = "ncsn"
    model.scale_by_sigma = False
    model.sigma_max = 1.0
    model.num_scales = 10
    model.ema_rate = 0.0
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.nf = 128
    model.interpolation = "bilinear"

    optim = config.optim
    optim.lr = 1e-3
    optim.warmup = 0
    optim.grad_clip = -1.0                # no clipping
    return config
