"""Normalization layers of the RefineNet score networks (NCSN, NCSNv2), chosen by config.model.normalization.

Images are NHWC. "Instance" statistics are per sample and channel over the spatial axes, with the population
variance and eps = 1e-5 (PyTorch's InstanceNorm2d). Parameter names and shapes follow the score-SDE code, so its
checkpoints load unchanged.

Instance norm++ (NCSN, seed 004, Appendix A) adds back what plain instance normalization removes: the relative
size of the channel means. With μ_c, s_c² the spatial mean and variance of channel c, m and v the mean and the
(population) variance of μ_1..μ_C over channels, and μ̃_c = (μ_c − m) / √(v + eps):

    out_c = γ_c ((x_c − μ_c) / √(s_c² + eps) + α_c μ̃_c) + β_c.

The conditional version looks γ, α, β up per noise level (an embedding of the level index). The PyTorch originals
take the unbiased variance of the channel means (v · C/(C − 1)); score-SDE (JAX) and this code take the population
variance: a difference in numbers only, never in parameters.
"""
import functools

import flax.linen as nn
import jax.numpy as jnp

EPS = 1e-5


def one_plus_normal(stddev=0.02):
    """Initializer 1 + N(0, stddev²): the scale parameters start near identity (as in NCSN)."""

    def init(key, shape, dtype=jnp.float32):
        return 1.0 + stddev * nn.initializers.normal(1.0)(key, shape, dtype)

    return init


def instance_standardize(x):
    """(x − μ) / √(s² + eps) per sample and channel over the spatial axes; x [B, H, W, C]."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.var(x, axis=(1, 2), keepdims=True)
    return (x - mean) / jnp.sqrt(var + EPS)


def standardized_channel_means(x):
    """μ̃ [B, 1, 1, C]: the spatial channel means standardized across channels (instance norm++, seed 004)."""
    means = jnp.mean(x, axis=(1, 2), keepdims=True)
    m = jnp.mean(means, axis=-1, keepdims=True)
    v = jnp.var(means, axis=-1, keepdims=True)
    return (means - m) / jnp.sqrt(v + EPS)


def instance_norm_plus(x, gamma, alpha, beta):
    """γ ((x − μ)/√(s² + eps) + α μ̃) + β; γ, α, β broadcast to [B, 1, 1, C] (seed 004, Appendix A)."""
    return gamma * (instance_standardize(x) + alpha * standardized_channel_means(x)) + beta


class InstanceNorm2d(nn.Module):
    """Instance normalization with a learned per-channel scale and bias (params "scale", "bias")."""

    bias: bool = True

    @nn.compact
    def __call__(self, x):
        shape = (1, 1, 1, x.shape[-1])
        h = instance_standardize(x) * self.param("scale", nn.initializers.ones, shape)
        if self.bias:
            h = h + self.param("bias", nn.initializers.zeros, shape)
        return h


class VarianceNorm2d(nn.Module):
    """Division by the spatial standard deviation, no centering (params "scale", "bias")."""

    bias: bool = False

    @nn.compact
    def __call__(self, x):
        shape = (1, 1, 1, x.shape[-1])
        h = x / jnp.sqrt(jnp.var(x, axis=(1, 2), keepdims=True) + EPS)
        h = h * self.param("scale", one_plus_normal(), shape)
        if self.bias:
            h = h + self.param("bias", nn.initializers.zeros, shape)
        return h


class InstanceNorm2dPlus(nn.Module):
    """Instance norm++ with learned per-channel α, γ (init 1 + N(0, 0.02²)) and β (init 0); NCSNv2's norm."""

    bias: bool = True

    @nn.compact
    def __call__(self, x):
        shape = (1, 1, 1, x.shape[-1])
        alpha = self.param("alpha", one_plus_normal(), shape)
        gamma = self.param("gamma", one_plus_normal(), shape)
        beta = self.param("beta", nn.initializers.zeros, shape) if self.bias else 0.0
        return instance_norm_plus(x, gamma, alpha, beta)


def conditional_embedding_init(num_features, bias):
    """Rows [γ | α | β] per noise level: γ, α ~ 1 + N(0, 0.02²), β = 0 (NCSN's initialization)."""
    scale_init = one_plus_normal()

    def init(key, shape, dtype=jnp.float32):
        scales = scale_init(key, (shape[0], 2 * num_features), dtype)
        if not bias:
            return scales
        return jnp.concatenate([scales, jnp.zeros((shape[0], num_features), dtype)], axis=-1)

    return init


class ConditionalInstanceNorm2dPlus(nn.Module):
    """Instance norm++ whose γ, α, β are looked up per noise-level index y [B] (NCSN v1, seed 004).

    One nn.Embed ("Embed_0/embedding", shape [num_classes, 3C], columns γ | α | β) as in score-SDE.
    """

    num_classes: int
    bias: bool = True

    @nn.compact
    def __call__(self, x, y):
        c = x.shape[-1]
        width = 3 * c if self.bias else 2 * c
        embed = nn.Embed(self.num_classes, width, embedding_init=conditional_embedding_init(c, self.bias))
        params = embed(y)[:, None, None, :]
        gamma, alpha = params[..., :c], params[..., c:2 * c]
        beta = params[..., 2 * c:] if self.bias else 0.0
        return instance_norm_plus(x, gamma, alpha, beta)


_NORMALIZATIONS = {
    "InstanceNorm": InstanceNorm2d,
    "InstanceNorm++": InstanceNorm2dPlus,
    "VarianceNorm": VarianceNorm2d,
    "GroupNorm": nn.GroupNorm,
}
_CONDITIONAL_NORMALIZATIONS = {
    "InstanceNorm++": ConditionalInstanceNorm2dPlus,
}


def get_normalization(config, conditional=False):
    """The normalization module class named by config.model.normalization (a partial, called without args).

    Conditional norms get one embedding row per noise level: num_classes = config.model.num_scales.
    """
    name = config.model.normalization
    registry = _CONDITIONAL_NORMALIZATIONS if conditional else _NORMALIZATIONS
    if name not in registry:
        kind = "conditional " if conditional else ""
        raise ValueError(f"unknown {kind}normalization {name!r}; set config.model.normalization to one of "
                         f"{sorted(registry)}")
    if conditional:
        return functools.partial(registry[name], num_classes=config.model.num_scales)
    return registry[name]
