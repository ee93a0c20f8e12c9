"""Experiment configs: ml_collections `get_config()` files, and `smoke`, which shrinks any of them to a laptop run.

The layout is the score-SDE code's (yang-song/score_sde), so its users find every experiment where they expect it:
default_<dataset>_configs.py hold the dataset bases (CIFAR-10, CelebA, LSUN / CelebA-HQ / FFHQ, MNIST, ImageNet
32x32); ve/, vp/ and subvp/ the experiments by SDE, with ve/ncsn and ve/ncsnv2 the SMLD models of Song & Ermon
(2019, 2020), vp/ddpm those of Ho et al. (2020), and vp/ and subvp/<dataset>_ddpmpp*_likelihood the maximum
likelihood training of seed 001 (Song, Durkan et al. 2021; yang-song/score_flow); toy/ the low-dimensional ones.
Each experiment's docstring gives the command that runs it, the published result it should reproduce, and what it
costs.
"""
import copy

import ml_collections

# The same experiment at laptop size: a few steps of a tiny network on 16x16 images. Only fields the config has
# are changed, so the SDE, objective, sampler and architecture family stay those of the experiment.
_SMOKE = {
    "training": dict(batch_size=8, n_iters=4, n_jitted_steps=1, log_freq=1, eval_freq=2, snapshot_freq=2,
                     snapshot_freq_for_preemption=2),
    "sampling": dict(n_steps_each=1, num_samples=8),
    "eval": dict(batch_size=8, num_samples=8, num_test=8, bpd_repeats=1, begin_ckpt=1, end_ckpt=2),
    "data": dict(image_size=16),
    # nf 32: the DDPM U-Net's GroupNorm has 32 groups, so its widths must be multiples of 32.
    # attn_resolutions (8,): the lowest resolution of a 16x16 input with ch_mult (1, 2).
    # num_scales 50: DDPM's discrete β_i reach β_max / N, which must stay below 1 (0.4 here).
    "model": dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_scales=50),
    "dequantizer": dict(num_steps=4, batch_size=8, features=8, snapshot_freq=2, warmup=0),
}


def smoke(config):
    """A copy of `config` shrunk to a seconds-long run of the same experiment (tests, benchmarks, CI).

    Width nf 32, ch_mult (1, 2), one residual block per level, attention at the lowest resolution, 16x16 images,
    batch 8, 4 training steps (checkpoint, eval and log every step or two), 50 noise scales, one corrector step,
    4 dequantizer steps.
    The input is not modified (a FrozenConfigDict is accepted too).
    """
    small = copy.deepcopy(ml_collections.ConfigDict(config))
    for section, values in _SMOKE.items():
        fields = small.get(section, {})
        for key, value in values.items():
            if key in fields:
                fields[key] = value
    return small
