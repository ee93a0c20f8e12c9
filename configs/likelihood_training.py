"""Seed 001's maximum-likelihood training (Song, Durkan, Murray & Ermon 2021) as changes to a score-SDE experiment.

The seed-001 configs (vp/ and subvp/{cifar10,imagenet32}_ddpmpp{,_deep}_likelihood.py) are the score-SDE DDPM++
experiments of the same SDE and depth with these changes, the values of yang-song/score_flow's configs run with
--config.training.likelihood_weighting --config.training.importance_weighting.
"""


def likelihood_training(config, eps, sampling_eps):
    """config (a score-SDE continuous DDPM++ experiment) trained and evaluated as seed 001 does, in place.

    Likelihood weighting with importance-sampled t on [eps, T] (SPEC §3), the likelihood measured from the same eps
    (score_flow's likelihood eps; override training.eps and eval.eps together), the probability-flow ODE sampler
    from sampling_eps, bits/dim at the last checkpoint only, no data augmentation (the paper: "without any data
    augmentation"; score_flow's CIFAR-10 default flips, its checkpoints so trained are the ones named _flip).
    """
    training = config.training
    training.weighting = "likelihood_importance"  # λ = g², t ~ q(t) ∝ g²/σ_t² (SPEC §3)
    training.eps = eps
    config.sampling.method = "ode"        # score_flow samples with the probability-flow ODE
    config.sampling.eps = sampling_eps
    evaluate = config.eval
    evaluate.begin_ckpt = evaluate.end_ckpt = training.n_iters // training.snapshot_freq
    evaluate.enable_loss = False
    evaluate.enable_bpd = True
    evaluate.eps = eps
    config.data.random_flip = False
    return config
