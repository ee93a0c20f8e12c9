"""DDPM++ cont. (deep: 8 residual blocks per resolution) on ImageNet 32x32 with the VP SDE, trained by approximate
maximum likelihood: seed 001 (Song, Durkan, Murray & Ermon 2021, "Maximum likelihood training of score-based
diffusion models").

    python main.py --config=configs/vp/imagenet32_ddpmpp_deep_likelihood.py --workdir=runs/vp_imagenet32_ddpmpp_deep_likelihood --mode=train
    python main.py --config=configs/vp/imagenet32_ddpmpp_deep_likelihood.py --workdir=runs/vp_imagenet32_ddpmpp_deep_likelihood --mode=eval

Training: the likelihood weighting λ = g² with t drawn from q(t) ∝ g²/σ_t² (training.weighting =
"likelihood_importance", SPEC §3) on [eps, 1], eps = 5e-5 (σ_eps ≈ 2.2e-3). score_flow uses 5e-5 only with
likelihood weighting and importance sampling, 1e-5 otherwise: with another weighting add --config.training.eps=1e-5
--config.eval.eps=1e-5. The values are those of score_flow's configs/vp/imagenet32_ddpmpp_deep_continuous.py
(yang-song/score_flow) run with --config.training.likelihood_weighting --config.training.importance_weighting; the
paper's λ = σ² baseline is this file with --config.training.weighting=sigma2.
Evaluation: bits/dim of the probability-flow ODE started at eps (score_flow's likelihood eps) on uniformly
dequantized images, one pass over the ~50,000 validation images (score_flow's num_repeats), at the last checkpoint
(19); --config.eval.enable_bound=True adds the seed's bound on the SDE model.
Expected: no ImageNet 32x32 number per configuration is quoted here (the paper's Table 2 has them; not available to
verify). The seed's best models reach 2.83 bits/dim on CIFAR-10 and 3.76 on ImageNet 32x32 without data augmentation
(NeurIPS 2021 abstract; the arXiv v1 abstract, the seed text, gives 2.74 and 3.76), with variational dequantization,
which --mode=train_dequantizer and then --mode=eval with --config.eval.dequantizer=True add after training
(config.dequantizer: score_flow's settings; run_lib.train_dequantizer).
Cost: 950k steps at batch 128 (~95 epochs of the ~1.28M training images) with the network and time per step of the
CIFAR-10 config; the evaluation solves the probability-flow ODE once per validation image (~50,000 solves).
"""
from configs.default_imagenet32_configs import to_imagenet32
from configs.likelihood_training import likelihood_training
from configs.vp import cifar10_ddpmpp_deep_continuous


def get_config():
    # eps = 5e-5: σ_eps ≈ 2.2e-3, under a third of a pixel bin (2/256)
    config = likelihood_training(cifar10_ddpmpp_deep_continuous.get_config(), eps=5e-5, sampling_eps=1e-3)
    return to_imagenet32(config)
