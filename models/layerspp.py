"""The NCSN++ / DDPM++ building blocks (score-SDE's layerspp), with the same module and parameter names.

Convolutions are created in the calling module (`Conv_<n>`), group norms use min(C/4, 32) groups, and residual
and attention outputs are divided by √2 with skip_rescale. The "fourier" noise embedding is
layers.GaussianFourierProjection (score-SDE's class name and parameter `W`).
"""
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from models import up_or_down_sampling as updown
from models.layers import (
    NIN,
    ddpm_conv1x1 as conv1x1,
    ddpm_conv3x3 as conv3x3,
    default_init,
    spatial_self_attention,
)


def group_norm(x):
    """A GroupNorm with min(C/4, 32) groups, created in the calling module."""
    return nn.GroupNorm(num_groups=min(x.shape[-1] // 4, 32))(x)


def residual_sum(x, h, skip_rescale):
    """x + h, divided by √2 when skip_rescale (keeps the variance of a sum of two unit-variance branches)."""
    return (x + h) / np.sqrt(2.0) if skip_rescale else x + h


_COMBINE = {
    "cat": lambda h, y: jnp.concatenate([h, y], axis=-1),
    "sum": lambda h, y: h + y,
}


class Combine(nn.Module):
    """Merge a skip input x into y: a 1x1 conv of x to y's channels, then concatenated ("cat") or added ("sum")."""

    method: str = "cat"

    @nn.compact
    def __call__(self, x, y):
        if self.method not in _COMBINE:
            raise ValueError(f"unknown progressive_combine {self.method!r}; choose one of {sorted(_COMBINE)}")
        return _COMBINE[self.method](conv1x1(x, y.shape[-1]), y)


class AttnBlockpp(nn.Module):
    """DDPM's self-attention block with GroupNorm(min(C/4, 32)), output init_scale and skip_rescale."""

    skip_rescale: bool = False
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = group_norm(x)
        q, k, v = NIN(c)(h), NIN(c)(h), NIN(c)(h)
        h = NIN(c, init_scale=self.init_scale)(spatial_self_attention(q, k, v))
        return residual_sum(x, h, self.skip_rescale)


class Upsample(nn.Module):
    """2x upsampling to out_ch channels: nearest (+ 3x3 conv), or FIR (fused with a 3x3 conv when with_conv)."""

    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, x):
        out_ch = self.out_ch or x.shape[-1]
        if self.fir and self.with_conv:
            return updown.Conv2d(out_ch, 3, up=True, resample_kernel=self.fir_kernel, kernel_init=default_init())(x)
        h = updown.upsample_2d(x, self.fir_kernel) if self.fir else updown.naive_upsample_2d(x)
        return conv3x3(h, out_ch) if self.with_conv else h


class Downsample(nn.Module):
    """2x downsampling to out_ch channels: stride-2 3x3 conv or average pooling, or FIR (fused with a conv)."""

    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, x):
        out_ch = self.out_ch or x.shape[-1]
        if self.fir and self.with_conv:
            return updown.Conv2d(out_ch, 3, down=True, resample_kernel=self.fir_kernel, kernel_init=default_init())(x)
        if self.with_conv:
            return conv3x3(x, out_ch, stride=2)
        return updown.downsample_2d(x, self.fir_kernel) if self.fir else updown.naive_downsample_2d(x)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM's residual block with GroupNorm(min(C/4, 32)), output conv init_scale and skip_rescale."""

    act: Callable
    out_ch: Optional[int] = None
    conv_shortcut: bool = False
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x, temb=None, train=False):
        out_ch = self.out_ch or x.shape[-1]
        h = conv3x3(self.act(group_norm(x)), out_ch)
        h = _add_time_bias(h, temb, self.act)
        h = nn.Dropout(self.dropout, deterministic=not train)(self.act(group_norm(h)))
        h = conv3x3(h, out_ch, init_scale=self.init_scale)
        if x.shape[-1] != out_ch:
            x = conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
        return residual_sum(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN's residual block: resampling (up or down, FIR or naive) inside the block, a 1x1 conv shortcut."""

    act: Callable
    up: bool = False
    down: bool = False
    out_ch: Optional[int] = None
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0

    def resample(self, x):
        if self.up:
            return updown.upsample_2d(x, self.fir_kernel) if self.fir else updown.naive_upsample_2d(x)
        if self.down:
            return updown.downsample_2d(x, self.fir_kernel) if self.fir else updown.naive_downsample_2d(x)
        return x

    @nn.compact
    def __call__(self, x, temb=None, train=False):
        out_ch = self.out_ch or x.shape[-1]
        h = self.resample(self.act(group_norm(x)))
        x_in_channels = x.shape[-1]
        x = self.resample(x)
        h = _add_time_bias(conv3x3(h, out_ch), temb, self.act)
        h = nn.Dropout(self.dropout, deterministic=not train)(self.act(group_norm(h)))
        h = conv3x3(h, out_ch, init_scale=self.init_scale)
        if x_in_channels != out_ch or self.up or self.down:
            x = conv1x1(x, out_ch)
        return residual_sum(x, h, self.skip_rescale)


def _add_time_bias(h, temb, act):
    """h + a per-channel bias Dense(act(temb)) (no-op for an unconditional network, temb None)."""
    if temb is None:
        return h
    return h + nn.Dense(h.shape[-1], kernel_init=default_init())(act(temb))[:, None, None, :]
