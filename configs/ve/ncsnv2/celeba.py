"""NCSNv2 (Song & Ermon 2020) on 64x64 CelebA: all five techniques, 500 noise levels from σ_max 90.

    python main.py --config=configs/ve/ncsnv2/celeba.py --workdir=runs/ncsnv2_celeba --mode=train

Expected: see the CelebA results of Song & Ermon 2020 (arXiv:2006.09011).
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
    sampling.n_steps_each = 5
    sampling.snr = 0.128
    sampling.step_lr = 3.3e-6             # ε of method "ald" = 2 (snr σ_min)²: the corrector's steps
    sampling.eps = 1e-5

    model = config.model
    model.name = "ncsnv2_64"
    model.scale_by_sigma = True           # technique 3: an unconditional network whose output is divided by σ
    model.num_scales = 500
    model.ema_rate = 0.999
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.nf = 128
    model.interpolation = "bilinear"

    optim = config.optim
    optim.lr = 1e-4
    optim.warmup = 0
    optim.grad_clip = -1.0                # no clipping
    return config
