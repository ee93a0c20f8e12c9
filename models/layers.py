"""Layers shared by the score networks: noise-level embeddings."""
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
