"""Layers shared by the score networks: noise-level embeddings, DDPM convolutions, attention and residual blocks."""
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sinusoidal_embedding(labels, dim, max_positions=10000):
    """The transformer/DDPM positional embedding of (possibly fractional) labels [B] -> [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-np.log(max_positions) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = labels.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class GaussianFourierProjection(nn.Module):
    """Random Fourier features (score-SDE's "fourier" embedding, applied to log σ); the frequencies are fixed."""

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        proj = x[:, None] * jax.lax.stop_gradient(w)[None, :] * 2 * np.pi
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def noise_embedding(labels, config):
    """The embedding of noise labels named by config.model.embedding_type ("positional" or "fourier")."""
    m = config.model
    if m.embedding_type == "fourier":
        # VE networks are given σ; the Fourier features see log σ (as in NCSN++).
        return GaussianFourierProjection(embedding_size=m.nf, scale=m.fourier_scale)(jnp.log(labels))
    if m.embedding_type == "positional":
        return sinusoidal_embedding(labels, m.nf)
    raise ValueError(f"unknown embedding_type {m.embedding_type!r}; choose 'positional' or 'fourier'")


# --- DDPM building blocks (the score-SDE conventions: module and parameter names match its flax checkpoints). ---

def default_init(scale=1.0):
    """DDPM's initializer: variance scaling, fan_avg, uniform; scale 0 becomes 1e-10 (zero-initialized layers)."""
    return nn.initializers.variance_scaling(scale if scale else 1e-10, "fan_avg", "uniform")


def ddpm_conv3x3(x, features, stride=1, bias=True, init_scale=1.0):
    """A 3x3 'SAME' convolution with DDPM initialization, created in the calling module (named Conv_<n> there)."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME", use_bias=bias,
                   kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros)(x)


def ddpm_conv1x1(x, features, stride=1, bias=True, init_scale=1.0):
    """A 1x1 convolution with DDPM initialization, created in the calling module."""
    return nn.Conv(features, (1, 1), strides=(stride, stride), padding="SAME", use_bias=bias,
                   kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros)(x)


# The score-SDE name of the DDPM timestep embedding (same formula as sinusoidal_embedding).
get_timestep_embedding = sinusoidal_embedding


def get_sigmas(config):
    """The NCSN noise levels σ_max > ... > σ_min, geometric, num_scales of them (SPEC §1, SMLD discretization)."""
    m = config.model
    return jnp.asarray(np.exp(np.linspace(np.log(m.sigma_max), np.log(m.sigma_min), m.num_scales)), jnp.float32)


ACTIVATIONS = {
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": lambda x: nn.leaky_relu(x, negative_slope=0.2),
    "swish": nn.swish,
}


def get_act(config):
    """The activation named by config.model.nonlinearity."""
    name = config.model.nonlinearity.lower()
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown nonlinearity {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class NIN(nn.Module):
    """A per-pixel dense layer ("network in network"): parameters W [in, out] and b [out]."""

    num_units: int
    init_scale: float = 0.1

    @nn.compact
    def __call__(self, x):
        w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units))
        b = self.param("b", nn.initializers.zeros, (self.num_units,))
        return jnp.tensordot(x, w, axes=1) + b


def spatial_self_attention(q, k, v):
    """Single-head attention over all H·W positions of [B, H, W, C] queries, keys and values."""
    b, h, w, c = q.shape
    logits = jnp.einsum("bic,bjc->bij", q.reshape(b, h * w, c), k.reshape(b, h * w, c)) * c**-0.5
    out = jnp.einsum("bij,bjc->bic", jax.nn.softmax(logits, axis=-1), v.reshape(b, h * w, c))
    return out.reshape(b, h, w, c)


class AttnBlock(nn.Module):
    """DDPM's self-attention block: x + NIN(attention(NIN_q, NIN_k, NIN_v of norm(x))), output NIN zero-init."""

    normalize: Callable = nn.GroupNorm

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = self.normalize()(x)
        q, k, v = NIN(c)(h), NIN(c)(h), NIN(c)(h)
        return x + NIN(c, init_scale=0.0)(spatial_self_attention(q, k, v))


class Upsample(nn.Module):
    """DDPM's 2x nearest-neighbour upsampling, optionally followed by a 3x3 convolution."""

    with_conv: bool = False

    @nn.compact
    def __call__(self, x):
        h = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return ddpm_conv3x3(h, x.shape[-1]) if self.with_conv else h


class Downsample(nn.Module):
    """DDPM's 2x downsampling: a stride-2 3x3 convolution, or 2x2 average pooling."""

    with_conv: bool = False

    @nn.compact
    def __call__(self, x):
        if self.with_conv:
            return ddpm_conv3x3(x, x.shape[-1], stride=2)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class ResnetBlockDDPM(nn.Module):
    """DDPM's residual block: norm, act, conv, + Dense(act(temb)), norm, act, dropout, zero-init conv, + shortcut.

    The shortcut is the identity, or (when the channel count changes) a NIN or a 3x3 conv (conv_shortcut).
    """

    act: Callable
    normalize: Callable = nn.GroupNorm
    out_ch: Optional[int] = None
    conv_shortcut: bool = False
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, temb=None, train=False):
        out_ch = self.out_ch or x.shape[-1]
        h = ddpm_conv3x3(self.act(self.normalize()(x)), out_ch)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init())(self.act(temb))[:, None, None, :]
        h = self.act(self.normalize()(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = ddpm_conv3x3(h, out_ch, init_scale=0.0)
        if x.shape[-1] != out_ch:
            x = ddpm_conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
        return x + h


def time_embedding_mlp(emb, nf, act):
    """DDPM's time MLP on a noise embedding: Dense(4 nf), act, Dense(4 nf), created in the calling module."""
    temb = nn.Dense(nf * 4, kernel_init=default_init())(emb)
    return nn.Dense(nf * 4, kernel_init=default_init())(act(temb))


def check_image_batch(x, num_resolutions):
    """Raise a ValueError unless x is [B, H, W, C] with H and W divisible by 2^(num_resolutions - 1)."""
    factor = 2 ** (num_resolutions - 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(f"expected images [B, H, W, C] with H, W divisible by {factor} (len(config.model.ch_mult)"
                         f" = {num_resolutions} resolutions), got shape {x.shape}")
