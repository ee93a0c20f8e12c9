"""The DDPM U-Net (Ho et al. 2020; the score-SDE flax port), registered as "ddpm".

Configured by config.model as in the score-SDE configs: nf, ch_mult, num_res_blocks, attn_resolutions, dropout,
resamp_with_conv, conditional, nonlinearity, normalization ("GroupNorm": 32 groups, so nf·ch_mult must be
multiples of 32), scale_by_sigma; config.data.centered False maps the input 2x - 1 first. Labels are DDPM
timesteps (999 t or an integer level) and always get the sinusoidal embedding; with scale_by_sigma (SMLD
training) the output is divided by sigmas[label] (layers.get_sigmas, decreasing).

The parameter tree has the score-SDE flax names (Dense_0/1, Conv_<n>, ResnetBlockDDPM_<n>, AttnBlock_<n>,
Downsample_<n>, Upsample_<n>, GroupNorm_0), created in the same order, so its checkpoints map 1:1. The one
difference: score-SDE also accepts the NCSN normalizations here (InstanceNorm++ etc.); only GroupNorm, the one its
DDPM configs use, is offered.
"""
import functools

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models import register_model
from models.layers import (
    AttnBlock,
    Downsample,
    ResnetBlockDDPM,
    Upsample,
    check_image_batch,
    ddpm_conv3x3,
    get_act,
    get_sigmas,
    get_timestep_embedding,
    time_embedding_mlp,
)

_NORMALIZATIONS = {"GroupNorm": nn.GroupNorm}


def _normalization(m):
    if m.normalization not in _NORMALIZATIONS:
        raise ValueError(f"config.model.normalization = {m.normalization!r}; the DDPM model offers "
                         f"{sorted(_NORMALIZATIONS)}")
    return _NORMALIZATIONS[m.normalization]


def _downsampling_path(m, h, res, attn):
    hs = [h]
    for level, mult in enumerate(m.ch_mult):
        for _ in range(m.num_res_blocks):
            h = res(hs[-1], m.nf * mult)
            if h.shape[1] in m.attn_resolutions:
                h = attn()(h)
            hs.append(h)
        if level != len(m.ch_mult) - 1:
            hs.append(Downsample(with_conv=m.resamp_with_conv)(hs[-1]))
    return hs


def _upsampling_path(m, h, hs, res, attn):
    for level in reversed(range(len(m.ch_mult))):
        for _ in range(m.num_res_blocks + 1):
            h = res(jnp.concatenate([h, hs.pop()], axis=-1), m.nf * m.ch_mult[level])
        if h.shape[1] in m.attn_resolutions:
            h = attn()(h)
        if level != 0:
            h = Upsample(with_conv=m.resamp_with_conv)(h)
    return h


@register_model(name="ddpm")
class DDPM(nn.Module):
    """x [B, H, W, C] (data in [0, 1], or [-1, 1] if config.data.centered) and labels [B] -> [B, H, W, C]."""

    config: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x, labels, train=False):
        m = self.config.model
        check_image_batch(x, len(m.ch_mult))
        act = get_act(self.config)
        normalize = _normalization(m)
        temb = None
        if m.conditional:
            temb = time_embedding_mlp(get_timestep_embedding(labels, m.nf), m.nf, act)
        block = functools.partial(ResnetBlockDDPM, act=act, normalize=normalize, dropout=m.dropout)

        def res(h, out_ch=None):
            return block(out_ch=out_ch)(h, temb, train)

        attn = functools.partial(AttnBlock, normalize=normalize)
        h = x if self.config.data.centered else 2 * x - 1.0
        hs = _downsampling_path(m, ddpm_conv3x3(h, m.nf), res, attn)
        h = res(attn()(res(hs[-1])))
        h = _upsampling_path(m, h, hs, res, attn)
        h = ddpm_conv3x3(act(normalize()(h)), x.shape[-1], init_scale=0.0)
        if m.scale_by_sigma:
            h = h / get_sigmas(self.config)[labels.astype(jnp.int32)].reshape((-1, 1, 1, 1))
        return h
