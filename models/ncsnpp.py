"""NCSN++ and DDPM++ (score-SDE, Song et al. 2021, Appendix H): one U-Net family named "ncsnpp" in the registry.

Configured by config.model, field for field as the score-SDE configs:
- resblock_type "ddpm" (ResnetBlockDDPMpp, resampling by Upsample/Downsample) or "biggan" (ResnetBlockBigGANpp,
  resampling inside the block); fir / fir_kernel: FIR-filtered resampling; skip_rescale: residual sums / √2;
  init_scale: the scale of the zero-ish output convolutions (0 = 1e-10).
- progressive_input "none" | "input_skip" | "residual" and progressive "none" | "output_skip" | "residual": the
  input / output image pyramids; progressive_combine "sum" | "cat" merges the input pyramid for input_skip.
- embedding_type "fourier" (labels are σ; Gaussian Fourier features of log σ) or "positional" (labels are 999 t
  or an integer level; sinusoidal). conditional False drops the time MLP and the per-block time biases.
- scale_by_sigma (VE): the output is divided by σ, the label itself for "fourier", sigmas[label] for "positional"
  (sigmas = layers.get_sigmas(config), decreasing). config.data.centered False: the input is mapped 2x - 1 first.
DDPM++ is this model with resblock_type "biggan", fir False, progressive(_input) "none", "positional" (VP/sub-VP).
config.model.attention_type, conv_size and normalization are accepted and ignored, as in the score-SDE flax code.

The parameter tree has the score-SDE flax module names (GaussianFourierProjection_0, Dense_0/1, Conv_<n>,
ResnetBlockBigGANpp_<n> or ResnetBlockDDPMpp_<n>, AttnBlockpp_<n>, Downsample_<n>, Upsample_<n>, Combine_<n>,
GroupNorm_<n>), created in the same order, so a released score-SDE checkpoint maps 1:1.
"""
import functools

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models import register_model
from models.layers import check_image_batch, get_act, get_sigmas, noise_embedding, time_embedding_mlp
from models.layerspp import (
    AttnBlockpp,
    Combine,
    Downsample,
    ResnetBlockBigGANpp,
    ResnetBlockDDPMpp,
    Upsample,
    conv3x3,
    group_norm,
    residual_sum,
)


class _Blocks:
    """The configured building blocks; each call creates its flax module in the calling (NCSNpp) scope."""

    def __init__(self, m, act, temb, train):
        self.m, self.act, self.temb, self.train = m, act, temb, train
        self.fir = dict(fir=m.fir, fir_kernel=tuple(m.fir_kernel))
        common = dict(act=act, dropout=m.dropout, init_scale=m.init_scale, skip_rescale=m.skip_rescale)
        if m.resblock_type == "biggan":
            self.resblock = functools.partial(ResnetBlockBigGANpp, **self.fir, **common)
        else:
            self.resblock = functools.partial(ResnetBlockDDPMpp, **common)

    def res(self, h, out_ch=None, **resample):
        return self.resblock(out_ch=out_ch, **resample)(h, self.temb, self.train)

    def attn(self, h):
        return AttnBlockpp(init_scale=self.m.init_scale, skip_rescale=self.m.skip_rescale)(h)

    def down(self, h):
        if self.m.resblock_type == "biggan":
            return self.res(h, down=True)
        return Downsample(with_conv=self.m.resamp_with_conv, **self.fir)(h)

    def up(self, h):
        if self.m.resblock_type == "biggan":
            return self.res(h, up=True)
        return Upsample(with_conv=self.m.resamp_with_conv, **self.fir)(h)

    def head(self, h, channels, init_scale=1.0):
        """conv3x3(act(GroupNorm(h))): the output heads."""
        return conv3x3(self.act(group_norm(h)), channels, init_scale=init_scale)


# Input pyramid, after each downsampling: (blocks, pyramid, h) -> (pyramid, h).
def _input_none(b, pyramid, h):
    return pyramid, h


def _input_skip(b, pyramid, h):
    pyramid = Downsample(with_conv=False, **b.fir)(pyramid)
    return pyramid, Combine(method=b.m.progressive_combine)(pyramid, h)


def _input_residual(b, pyramid, h):
    pyramid = residual_sum(Downsample(out_ch=h.shape[-1], with_conv=True, **b.fir)(pyramid), h, b.m.skip_rescale)
    return pyramid, pyramid


_INPUT_PYRAMIDS = {"none": _input_none, "input_skip": _input_skip, "residual": _input_residual}


# Output pyramid, after each resolution of the upsampling path: (blocks, pyramid, h, channels) -> (pyramid, h);
# pyramid is None at the lowest resolution.
def _output_none(b, pyramid, h, channels):
    return pyramid, h


def _output_skip(b, pyramid, h, channels):
    out = b.head(h, channels, init_scale=b.m.init_scale)
    return (out if pyramid is None else Upsample(with_conv=False, **b.fir)(pyramid) + out), h


def _output_residual(b, pyramid, h, channels):
    if pyramid is None:
        return b.head(h, h.shape[-1]), h
    pyramid = Upsample(out_ch=h.shape[-1], with_conv=True, **b.fir)(pyramid)
    pyramid = residual_sum(pyramid, h, b.m.skip_rescale)
    return pyramid, pyramid


_OUTPUT_PYRAMIDS = {"none": _output_none, "output_skip": _output_skip, "residual": _output_residual}

_SIGMA_OF_LABELS = {
    "fourier": lambda labels, config: labels,
    "positional": lambda labels, config: get_sigmas(config)[labels.astype(jnp.int32)],
}


def _check_options(m):
    options = {
        "resblock_type": ("ddpm", "biggan"),
        "progressive": tuple(_OUTPUT_PYRAMIDS),
        "progressive_input": tuple(_INPUT_PYRAMIDS),
        "progressive_combine": ("sum", "cat"),
        "embedding_type": tuple(_SIGMA_OF_LABELS),
    }
    for field, allowed in options.items():
        if m[field] not in allowed:
            raise ValueError(f"config.model.{field} = {m[field]!r}; choose one of {allowed}")


def _downsampling_path(b, x, h):
    """The encoder: returns the skip activations hs (the last one is the input to the middle block)."""
    m = b.m
    pyramid, hs = x, [h]
    for level, mult in enumerate(m.ch_mult):
        for _ in range(m.num_res_blocks):
            h = b.res(hs[-1], m.nf * mult)
            if h.shape[1] in m.attn_resolutions:
                h = b.attn(h)
            hs.append(h)
        if level != len(m.ch_mult) - 1:
            h = b.down(hs[-1])
            pyramid, h = _INPUT_PYRAMIDS[m.progressive_input](b, pyramid, h)
            hs.append(h)
    return hs


def _upsampling_path(b, h, hs, channels):
    """The decoder: consumes hs and returns the output (channels) before any σ scaling."""
    m = b.m
    pyramid = None
    for level in reversed(range(len(m.ch_mult))):
        for _ in range(m.num_res_blocks + 1):
            h = b.res(jnp.concatenate([h, hs.pop()], axis=-1), m.nf * m.ch_mult[level])
        if h.shape[1] in m.attn_resolutions:
            h = b.attn(h)
        pyramid, h = _OUTPUT_PYRAMIDS[m.progressive](b, pyramid, h, channels)
        if level != 0:
            h = b.up(h)
    if m.progressive == "output_skip":
        return pyramid
    return b.head(h, channels, init_scale=m.init_scale)


@register_model(name="ncsnpp")
class NCSNpp(nn.Module):
    """x [B, H, W, C] (data in [0, 1], or [-1, 1] if config.data.centered) and labels [B] -> [B, H, W, C]."""

    config: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x, labels, train=False):
        m = self.config.model
        _check_options(m)
        check_image_batch(x, len(m.ch_mult))
        act = get_act(self.config)
        temb = noise_embedding(labels, self.config)
        temb = time_embedding_mlp(temb, m.nf, act) if m.conditional else None
        b = _Blocks(m, act, temb, train)
        if not self.config.data.centered:
            x = 2 * x - 1.0
        hs = _downsampling_path(b, x, conv3x3(x, m.nf))
        h = b.res(b.attn(b.res(hs[-1])))
        h = _upsampling_path(b, h, hs, x.shape[-1])
        if m.scale_by_sigma:
            h = h / _SIGMA_OF_LABELS[m.embedding_type](labels, self.config).reshape((-1, 1, 1, 1))
        return h
