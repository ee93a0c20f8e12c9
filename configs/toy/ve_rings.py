"""VE SDE on four concentric rings, sampled with the reverse-diffusion predictor and a Langevin corrector.

    python main.py --config=configs/toy/ve_rings.py --workdir=runs/ve_rings --mode=train

Expected: runs/ve_rings/samples/step_00004000.png shows four thin, equally populated rings.
Cost (2-core CPU; wall estimated from the CPU time measured on a shared machine):
train about 1 min (125 s of CPU time).
"""
from configs.default_toy_configs import get_default_configs


def get_config():
    config = get_default_configs()
    config.data.dataset = "rings"

    training = config.training
    training.sde = "vesde"
    training.weighting = "sigma2"
    training.batch_size = 256
    training.n_iters = 4000
    training.snapshot_freq = 2000
    training.snapshot_freq_for_preemption = 500

    model = config.model
    model.embedding_type = "fourier"     # of log σ, as NCSN++ for VE
    model.scale_by_sigma = True
    model.sigma_min = 0.01
    model.sigma_max = 8.0                # ≥ the data's diameter ≈ 6.5 (Song & Ermon 2020, technique 1)
    model.ema_rate = 0.995
    config.optim.lr = 2e-3

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.snr = 0.16
    sampling.eps = 1e-5

    config.eval.begin_ckpt = config.eval.end_ckpt = 2
    return config
