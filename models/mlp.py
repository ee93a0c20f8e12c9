"""A noise-conditional MLP score network for low-dimensional data (2-D toys, Gaussian mixtures)."""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models import register_model
from models.layers import noise_embedding


@register_model(name="mlp")
class MLPScore(nn.Module):
    """x [B, D] and noise labels [B] -> [B, D]. Width 2·nf, num_layers residual blocks.

    Each hidden layer adds a learned projection of the noise embedding (the same conditioning as a DDPM
    ResNet block). With config.model.scale_by_sigma the output is divided by the label σ (VE networks).
    """

    config: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x, labels, train=False):
        m = self.config.model
        act = nn.swish
        temb = noise_embedding(labels, self.config)
        temb = nn.Dense(m.nf * 4)(temb)
        temb = nn.Dense(m.nf * 4)(act(temb))
        width = m.nf * 2
        h = nn.Dense(width)(x.reshape(x.shape[0], -1))
        for _ in range(m.num_layers):
            r = nn.Dense(width)(act(h)) + nn.Dense(width)(act(temb))
            r = nn.Dropout(m.dropout, deterministic=not train)(act(r))
            h = h + nn.Dense(width)(r)
        out = nn.Dense(x[0].size, kernel_init=nn.initializers.zeros)(act(h)).reshape(x.shape)
        if m.scale_by_sigma:
            out = out / labels.reshape((-1,) + (1,) * (x.ndim - 1))
        return out
