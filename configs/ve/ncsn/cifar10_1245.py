"""NCSN on CIFAR-10 with techniques 1, 2, 4, 5 of Song & Ermon (2020): ncsn/cifar10_124 plus the EMA of the
weights; NCSNv2 without its technique 3 (the σ-scaled unconditional network).

    python main.py --config=configs/ve/ncsn/cifar10_1245.py --workdir=runs/ncsn_cifar10_1245 --mode=train

Expected: see the ablation of the techniques in Song & Ermon 2020 (arXiv:2006.09011).
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
    sampling.n_steps_each = 5
    sampling.snr = 0.176
    sampling.step_lr = 6.2e-6             # ε of method "ald" = 2 (snr σ_min)²: the corrector's steps
    sampling.eps = 1e-5

    model = config.model
    model.name = "ncsn"
    model.scale_by_sigma = False
    model.num_scales = 232
    model.ema_rate = 0.999
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.nf = 128
    model.interpolation = "bilinear"

    optim = config.optim
    optim.lr = 1e-3
    optim.warmup = 0
    optim.grad_clip = -1.0                # no clipping
    return config
