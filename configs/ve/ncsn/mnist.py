"""NCSN (Song & Ermon 2019) on MNIST as published: 10 noise levels from σ_max 1 to 0.01, the RefineNet at width 64,
annealed Langevin dynamics from uniform noise with ε = 2e-5 and 100 steps per level, no EMA, no denoising step.

    python main.py --config=configs/ve/ncsn/mnist.py --workdir=runs/ncsn_mnist --mode=train
    python main.py --config=configs/ve/ncsn/mnist.py --workdir=runs/ncsn_mnist --mode=sample
    python main.py --config=configs/ve/ncsn/mnist.py --workdir=runs/ncsn_mnist --mode=inpaint --inpaint_mask=right_half

Values: the paper's §4 and appendix, checked against ermongroup/ncsn configs/anneal.yml (the MNIST block: batch 128,
200,001 iterations, σ_begin 1, σ_end 0.01, 10 levels, ngf 64, Adam lr 1e-3, β1 0.9, no weight decay, λ(σ) = σ²
(anneal_power 2), uniformly dequantized pixels in [0, 1], no flips) and runners/anneal_runner.py (sampling from
U[0, 1], 100 steps per level at step_lr 2e-5, no final denoising). Data: tfds mnist (prepare it once with
`python scripts/prepare_dataset.py --dataset=mnist`).

The step convention: the paper's Algorithm 1 (and sampling.ald_sample, SPEC §6) steps x + (α_i/2) s + sqrt(α_i) z
with α_i = ε σ_i²/σ_L²; the released code steps x + α_i s + sqrt(2 α_i) z with the same ε, twice as far. This file
keeps the paper's ε = 2e-5 in the paper's convention; --config.sampling.step_lr=4e-5 reproduces the released code's
sampler (the PC route, --config.sampling.method=pc, predictor "none" with the "ald" corrector at snr 0.316, is the
code's step too, started from the prior N(0, σ_max² I) instead of U[0, 1]).

Expected: MNIST samples like the paper's Figure 5 and inpaintings like its Figure 6; the paper reports no score for
MNIST.
Cost: 200k steps at batch 128 of a 7.6M-parameter network on 28x28 images; the paper names no hardware time.
"""
from configs.default_mnist_configs import get_default_configs


def get_config():
    config = get_default_configs()
    training = config.training
    training.sde = "vesde"
    training.continuous = False           # 10 level indices, SMLD's discrete loss (SPEC §3, λ(σ_i) = σ_i²)
    training.batch_size = 128
    training.n_iters = 200001
    training.snapshot_freq = 20000        # 10 permanent checkpoints (the reference keeps one every 5k steps)
    training.snapshot_freq_for_preemption = 5000
    training.max_to_keep = 11
    training.reduce_mean = False          # ½ Σ over pixels of σ_i² (s + z/σ_i)², as the reference's loss

    sampling = config.sampling
    sampling.method = "ald"               # annealed Langevin dynamics (SPEC §6)
    sampling.predictor = "none"           # the PC route's settings (method "pc") and --mode=inpaint's for PC
    sampling.corrector = "ald"
    sampling.snr = 0.316
    sampling.step_lr = 2e-5               # ε = 2 (snr σ_min)²
    sampling.n_steps_each = 100           # T
    sampling.noise_removal = False        # no final x + σ_L² s step in the 2019 sampler (NCSNv2 added it)
    sampling.ald_init = "uniform"         # U[0, 1], as the reference
    sampling.eps = 1e-5

    evaluate = config.eval
    evaluate.begin_ckpt = 10              # the last checkpoint (200k steps)
    evaluate.end_ckpt = 10

    data = config.data
    data.centered = False                 # [0, 1]; the network sees 2x - 1 (models.refinenet_layers.center_input)
    data.uniform_dequantization = True    # the reference trains on x 255/256 + U[0, 1/256]

    model = config.model
    model.name = "ncsn"
    model.scale_by_sigma = False
    model.sigma_min = 0.01
    model.sigma_max = 1.0
    model.num_scales = 10
    model.ema_rate = 0.0
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.nf = 64                         # ngf 64 for MNIST (128 for CIFAR-10 and CelebA)
    model.interpolation = "bilinear"

    optim = config.optim
    optim.lr = 1e-3
    optim.warmup = 0
    optim.grad_clip = -1.0                # no clipping
    return config
