"""DDPM++ cont. on CIFAR-10 with the sub-VP SDE, trained by approximate maximum likelihood: seed 001 (Song, Durkan,
Murray & Ermon 2021, "Maximum likelihood training of score-based diffusion models").

    python main.py --config=configs/subvp/cifar10_ddpmpp_likelihood.py --workdir=runs/subvp_cifar10_ddpmpp_likelihood --mode=train
    python main.py --config=configs/subvp/cifar10_ddpmpp_likelihood.py --workdir=runs/subvp_cifar10_ddpmpp_likelihood --mode=eval

Training: the likelihood weighting λ = g² with t drawn from q(t) ∝ g²/σ_t² (training.weighting =
"likelihood_importance", SPEC §3) on [eps, 1], eps = 1e-2 (σ_eps ≈ 2.0e-3). The values are those of score_flow's
configs/subvp/cifar10_ddpmpp_continuous.py (yang-song/score_flow) run with --config.training.likelihood_weighting
--config.training.importance_weighting; the paper's λ = σ² baseline is this file with
--config.training.weighting=sigma2. One deviation: no horizontal flips (score_flow's CIFAR-10 default flips; its
released checkpoints trained so are the ones named _flip).
Evaluation: bits/dim of the probability-flow ODE started at eps (score_flow's likelihood eps) on uniformly
dequantized images, 5 passes over the 10,000 test images, at the last checkpoint (26);
--config.eval.enable_bound=True adds the seed's bound on the SDE model.
Expected: bits/dim below the 3.02 of the same network trained with λ = σ² (subvp/cifar10_ddpmpp_continuous: score-
SDE paper, Table 2, uniform dequantization), as the seed finds for every SDE and architecture. The seed's best
models reach 2.83 bits/dim on CIFAR-10 and 3.76 on ImageNet 32x32 without data augmentation (NeurIPS 2021 abstract;
the arXiv v1 abstract, the seed text, gives 2.74 and 3.76), with variational dequantization, which
--mode=train_dequantizer and then --mode=eval with --config.eval.dequantizer=True add after training
(config.dequantizer: score_flow's settings; run_lib.train_dequantizer).
Cost: 1.3M steps at batch 128, as subvp/cifar10_ddpmpp_continuous (configs/default_cifar10_configs.py gives the one
measured time per step); the evaluation solves the probability-flow ODE once per test image and pass (5 x 10,000
solves).
"""
from configs.likelihood_training import likelihood_training
from configs.subvp import cifar10_ddpmpp_continuous


def get_config():
    # eps = 1e-2: σ_eps ≈ 2.0e-3, under a third of a pixel bin (2/256)
    return likelihood_training(cifar10_ddpmpp_continuous.get_config(), eps=1e-2, sampling_eps=1e-2)
