"""VP SDE on the swiss roll, trained with the likelihood weighting and importance-sampled t (seed 001), sampled
with reverse diffusion + Langevin (PC, SPEC §7).

    python main.py --config=configs/toy/vp_swiss_roll.py --workdir=runs/vp_swiss_roll --mode=train

Expected: runs/vp_swiss_roll/samples/step_00004000.png shows the spiral's arms separated along its whole length.
Cost (2-core CPU; wall estimated from the CPU time measured on a shared machine):
train about 2 min (149 s of CPU time).
"""
from configs.default_toy_configs import get_default_configs


def get_config():
    config = get_default_configs()
    config.data.dataset = "swiss_roll"

    training = config.training
    training.sde = "vpsde"
    training.weighting = "likelihood_importance"
    training.batch_size = 256
    training.n_iters = 4000
    training.snapshot_freq = 2000
    training.snapshot_freq_for_preemption = 500

    config.model.ema_rate = 0.995
    config.optim.lr = 2e-3

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.snr = 0.16

    config.eval.begin_ckpt = config.eval.end_ckpt = 2
    return config
