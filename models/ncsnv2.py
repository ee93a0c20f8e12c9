"""NCSNv2 score networks (Song & Ermon 2020, "Improved techniques"), with the score-SDE names and parameter trees.

Unconditional RefineNets with instance norm++ whose output is divided by σ_label (config.model.scale_by_sigma;
technique 3 of the paper: s(x, σ) = net(x) / σ). Labels are noise-level indices into get_sigmas(config), the
VE SDE's discrete levels with index 0 = σ_max (sde.noise_labels(t, continuous=False)).

Registered as in score-SDE: "ncsnv2_64" (NCSNv2, images < 96 px: CIFAR-10, CelebA 64), "ncsnv2_128" (the
originals' NCSNv2Deeper, 96-128 px) and "ncsnv2_256" (NCSNv2Deepest, 129-256 px). Config fields: model.nf,
normalization, nonlinearity, interpolation, scale_by_sigma, sigma_min, sigma_max, num_scales; data.centered.

"ncsnv2_64" follows score-SDE (JAX), whose third RefineBlock is 2·nf wide; the PyTorch code (ermongroup/ncsnv2 and
score_sde_pytorch) makes it nf wide, so its checkpoints have different shapes in RefineBlock_2 and RefineBlock_3.
Parameters with nf = 128 (tests/test_models_ncsn.py): ncsnv2_64 33,970,563; ncsnv2_128 83,445,379; ncsnv2_256
94,132,611 (3 channels; none depends on the image size).
"""
import flax.linen as nn
import ml_collections

from models import register_model
from models.normalization import get_normalization
from models.refinenet_layers import (RefineBlock, ResidualBlock, center_input, check_image_size,
                                     check_level_labels, get_act, refinenet, scale_by_sigma)


class _NCSNv2Family(nn.Module):
    """x [B, H, W, C], labels [B] (level indices) -> the score [B, H, W, C]; `train` is unused (no dropout).

    STAGES: (width multiple of nf, resample, dilation) per ResNet stage; REFINE_WIDTHS: RefineBlock widths,
    deepest first.
    """

    config: ml_collections.FrozenConfigDict
    STAGES = ()
    REFINE_WIDTHS = ()

    @nn.compact
    def __call__(self, x, labels, train=False):
        name = self.config.model.name
        check_image_size(x, self.STAGES, name)
        if self.config.model.scale_by_sigma:
            check_level_labels(labels, name)
        m = self.config.model
        h = refinenet(center_input(x, self.config), (), nf=m.nf, stages=self.STAGES, widths=self.REFINE_WIDTHS,
                      act=get_act(self.config), normalizer=get_normalization(self.config),
                      interpolation=m.interpolation, residual_block=ResidualBlock, refine_block=RefineBlock)
        return scale_by_sigma(h, labels, self.config)


@register_model(name="ncsnv2_64")
class NCSNv2(_NCSNv2Family):
    """NCSNv2 for images below 96 px: one pooling, then dilations 2 and 4 at half resolution."""

    STAGES = ((1, None, 1), (2, "down", 1), (2, "down", 2), (2, "down", 4))
    REFINE_WIDTHS = (2, 2, 2, 1)


@register_model(name="ncsnv2_128")
class NCSNv2Deeper(_NCSNv2Family):
    """NCSNv2 for 96-128 px (score-SDE's NCSNv2_128): two poolings, then 4·nf wide dilated stages."""

    STAGES = ((1, None, 1), (2, "down", 1), (2, "down", 1), (4, "down", 2), (4, "down", 4))
    REFINE_WIDTHS = (4, 2, 2, 1, 1)


@register_model(name="ncsnv2_256")
class NCSNv2Deepest(_NCSNv2Family):
    """NCSNv2 for 129-256 px (score-SDE's NCSNv2_256): three poolings, then 4·nf wide dilated stages."""

    STAGES = ((1, None, 1), (2, "down", 1), (2, "down", 1), (2, "down", 1), (4, "down", 2), (4, "down", 4))
    REFINE_WIDTHS = (4, 2, 2, 2, 1, 1)
