"""NCSN (Song & Ermon 2019) on CIFAR-10 as published: 10 noise levels from σ_max 1 to 0.01, annealed Langevin with
100 steps per level, no EMA.

    python main.py --config=configs/ve/ncsn/cifar10.py --workdir=runs/ncsn_cifar10 --mode=train

Expected: IS 8.87, FID 25.32 (Song & Ermon 2019, CIFAR-10 results table), from their annealed Langevin sampler,
which has no final denoising step: add --config.sampling.noise_removal=False to match it.
Cost: 1.3M steps at batch 128 (the CIFAR-10 base); the hardware time is not published.
"""
from configs.default_cifar10_configs import get_default_configs


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
