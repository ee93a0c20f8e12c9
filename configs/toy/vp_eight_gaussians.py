"""VP SDE (DDPM's schedule) on eight Gaussians on a circle, with the σ²-weighted DSM loss and the
Euler-Maruyama sampler. The eight-Gaussian density is a known mixture, so eval also reports its entropy.

    python main.py --config=configs/toy/vp_eight_gaussians.py --workdir=runs/vp_eight_gaussians --mode=train
    python main.py --config=configs/toy/vp_eight_gaussians.py --workdir=runs/vp_eight_gaussians --mode=eval

Expected: runs/vp_eight_gaussians/samples/step_00003000.png shows eight separated, equally populated modes
(a few samples on the bridges between them); eval's test NLL lies within about 0.1 nats of the entropy ≈ 2.83.
Cost (2-core CPU; wall estimated from the CPU time measured on a shared machine):
train about 1 min (94 s of CPU time); eval about 1 min (45 s of CPU time).
"""
from configs.default_toy_configs import get_default_configs


def get_config():
    config = get_default_configs()
    config.data.dataset = "eight_gaussians"

    training = config.training
    training.sde = "vpsde"
    training.weighting = "sigma2"
    training.batch_size = 256
    training.n_iters = 3000
    training.snapshot_freq = 1500
    training.snapshot_freq_for_preemption = 500

    config.model.ema_rate = 0.995
    config.optim.lr = 2e-3

    config.sampling.method = "pc"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"

    config.eval.begin_ckpt = config.eval.end_ckpt = 2
    return config
