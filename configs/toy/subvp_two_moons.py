"""sub-VP SDE on two moons, trained with the likelihood weighting (λ = g², SPEC §3) and sampled with the
probability-flow ODE (an adaptive Runge-Kutta solve, SPEC §7).

    python main.py --config=configs/toy/subvp_two_moons.py --workdir=runs/subvp_two_moons --mode=train

Expected: runs/subvp_two_moons/samples/step_00003000.png shows both half-moons, evenly filled and as thin as
the data's noise.
Cost (2-core CPU; wall estimated from the CPU time measured on a shared machine):
train about 1 min (88 s of CPU time).
"""
from configs.default_toy_configs import get_default_configs


def get_config():
    config = get_default_configs()
    config.data.dataset = "two_moons"

    training = config.training
    training.sde = "subvpsde"
    training.weighting = "likelihood"
    training.batch_size = 256
    training.n_iters = 3000
    training.snapshot_freq = 1500
    training.snapshot_freq_for_preemption = 500

    config.model.ema_rate = 0.995
    config.optim.lr = 2e-3

    sampling = config.sampling
    sampling.method = "ode"
    sampling.noise_removal = False

    config.eval.begin_ckpt = config.eval.end_ckpt = 2
    return config
