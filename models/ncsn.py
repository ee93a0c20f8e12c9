"""NCSN v1 (seed 004): the noise-conditional RefineNet with dilated convolutions and conditional instance norm++.

The original CondRefineNetDilated (ermongroup/ncsn): a ResNet encoder (one 2x2 pooling, then dilations 2 and 4),
a four-block RefineNet decoder, ELU, and every normalization conditioned on the noise-level index through an
embedding of γ, α, β (models.normalization.ConditionalInstanceNorm2dPlus); 5x5 average pooling in the CRP blocks.
Labels are level indices into get_sigmas(config) (index 0 = σ_max; sde.noise_labels(t, continuous=False)).

The paper's hyper-parameters, in score-SDE config fields: model.nf = 128 (CIFAR-10, CelebA; 64 for MNIST),
model.num_scales = 10 levels (also the embedding rows), sigma_max = 1, sigma_min = 0.01, normalization
"InstanceNorm++", nonlinearity "elu", scale_by_sigma False (the network is conditioned, not rescaled);
interpolation "bilinear_align_corners" reproduces the original upsampling exactly, "bilinear" is score-SDE's.

Parameter tree: score-SDE's "ncsn" names (Conv_0, ConditionalResidualBlock_0..7, CondRefineBlock_0..3,
ConditionalInstanceNorm2dPlus_0, Conv_1). Its third CondRefineBlock is nf wide as in the original (score-SDE's JAX
code makes it 2·nf; its NCSN cannot run, see refinenet_layers, so no checkpoint depends on that).
Parameters (tests/test_models_ncsn.py): 30,117,635 for CIFAR-10 (nf 128, 10 levels), 7,638,657 for MNIST (nf 64).
"""
import functools

import flax.linen as nn
import ml_collections

from models import register_model
from models.normalization import get_normalization
from models.refinenet_layers import (CondRefineBlock, ConditionalResidualBlock, center_input, check_image_size,
                                     check_level_labels, get_act, refinenet, scale_by_sigma)

STAGES = ((1, None, 1), (2, "down", 1), (2, "down", 2), (2, "down", 4))
REFINE_WIDTHS = (2, 2, 1, 1)


@register_model(name="ncsn")
class NCSN(nn.Module):
    """x [B, H, W, C], integer labels [B] -> the score [B, H, W, C]; `train` is unused (no dropout)."""

    config: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x, labels, train=False):
        check_image_size(x, STAGES, "ncsn")
        check_level_labels(labels, "ncsn")
        m = self.config.model
        normalizer = get_normalization(self.config, conditional=True)
        h = refinenet(center_input(x, self.config), (labels,), nf=m.nf, stages=STAGES, widths=REFINE_WIDTHS,
                      act=get_act(self.config), normalizer=normalizer, interpolation=m.interpolation,
                      residual_block=ConditionalResidualBlock,
                      refine_block=functools.partial(CondRefineBlock, normalizer=normalizer))
        return scale_by_sigma(h, labels, self.config)
