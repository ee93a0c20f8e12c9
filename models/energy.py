"""Scalar energy networks E_θ(x) and the conservative score s = -∇x E_θ (SPEC §6, seed 003).

An energy model defines p_θ(x) = exp(-E_θ(x)) / Z_θ. Its networks map x [B, ...] and noise labels [B] to one
energy per example [B]; `models.get_score_fn` recognises them (class attribute `outputs_energy`) and returns the
conservative score -∇x E, so every sampler, likelihood and evaluator takes an energy model through the same
score_fn(x, t) seam as a score network, and its Jacobian (the negative Hessian of E) is symmetric by construction.

Every energy network ends in `EnergyReadout`: a linear read-out of the features times a fixed scale (config field
model.energy_scale = S > 0, default 1), an optional ½ q ||x||² (model.energy_quadratic = q ≥ 0; q > 0 makes
exp(-E) integrable whatever the network does far from the data) and a learnable scalar c (parameter
"log_normalizer"). S is an inverse temperature: Langevin chains with the noise ε that images need (~0.01 per pixel)
sample a sharp density only when ∇E is ~1/ε² large, which Adam (steps of ~lr in each weight) would take millions
of steps to grow from a zero read-out; S = 1e4 starts the energy at that scale, as the decoupled step sizes of Du
& Mordatch (2019) do implicitly. The score ignores c; noise-contrastive estimation learns it
as the log-normalizer, log p_θ = -E_θ = -(network + c) (SPEC §6), so after NCE training params[...]["log_normalizer"]
estimates log Z of the unnormalized rest.

Noise conditioning (config field model.conditional, default False): an unconditional energy ignores the labels, so
its score is the same at every t; a conditional one adds a projection of the noise embedding to every hidden layer
(as MLPScore) and, with model.scale_by_sigma (VE labels are σ), divides the energy by σ. Activations are smooth
(swish): score matching differentiates the score once more, and a ReLU network's Hessian is zero almost everywhere.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import network_output, register_model
from models.layers import noise_embedding
from models.refinenet_layers import center_input


class EnergyReadout(nn.Module):
    """Features h [B, F] and the input x [B, ...] -> energy [B] = S wᵀh + ½ q ||x||² + c (c: "log_normalizer")."""

    quadratic: float = 0.0
    scale: float = 1.0

    @nn.compact
    def __call__(self, h, x):
        if self.quadratic < 0 or self.scale <= 0:
            raise ValueError(f"config.model.energy_quadratic must be >= 0 and energy_scale > 0, got "
                             f"{self.quadratic} and {self.scale}")
        energy = self.scale * nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros)(h)[:, 0]
        log_normalizer = self.param("log_normalizer", nn.initializers.zeros, ())
        sq = jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)
        return energy + 0.5 * self.quadratic * sq + log_normalizer


def _conditioning(labels, config):
    """The noise embedding a conditional energy adds to its hidden layers, or None (unconditional)."""
    if not config.model.get("conditional", False):
        return None
    m = config.model
    temb = noise_embedding(labels, config)
    temb = nn.Dense(m.nf * 4)(temb)
    return nn.Dense(m.nf * 4)(nn.swish(temb))


def _finish(energy, labels, config):
    """E / σ_label for a conditional energy with model.scale_by_sigma (VE continuous labels are σ)."""
    if config.model.get("conditional", False) and config.model.get("scale_by_sigma", False):
        return energy / labels
    return energy


@register_model(name="energy_mlp")
class EnergyMLP(nn.Module):
    """x [B, D] (any trailing shape, flattened) and labels [B] -> energy [B]. Width 2·nf, num_layers residual
    blocks of swish MLPs, like MLPScore but with one scalar output."""

    config: ml_collections.FrozenConfigDict
    outputs_energy = True   # a class attribute, not a dataclass field: models.get_score_fn takes -∇x of the output

    @nn.compact
    def __call__(self, x, labels, train=False):
        m = self.config.model
        act, width = nn.swish, 2 * m.nf
        cond = _conditioning(labels, self.config)
        h = nn.Dense(width)(x.reshape(x.shape[0], -1))
        for _ in range(m.num_layers):
            r = nn.Dense(width)(act(h))
            if cond is not None:
                r = r + nn.Dense(width)(act(cond))
            r = nn.Dropout(m.get("dropout", 0.0), deterministic=not train)(act(r))
            h = h + nn.Dense(width)(r)
        energy = EnergyReadout(m.get("energy_quadratic", 0.0), m.get("energy_scale", 1.0))(act(h), x)
        return _finish(energy, labels, self.config)


@register_model(name="energy_conv")
class EnergyConv(nn.Module):
    """Images x [B, H, W, C] (any H, W, C) and labels [B] -> energy [B].

    A 3x3 convolution to nf channels, then for each entry k of model.ch_mult (default (1, 2, 2)) a block
    swish → 3x3 conv (nf·k) → swish → 3x3 conv with stride 2 (nf·k), halving H and W ('SAME' padding, so odd sizes
    round up: 28 → 14 → 7 → 4); a conditional energy adds the noise embedding's projection after each block's first
    convolution. Then the spatial mean, a dense layer of 2·nf and EnergyReadout. The input is centred to [-1, 1]
    when config.data.centered is False, as the score networks do.
    """

    config: ml_collections.FrozenConfigDict
    outputs_energy = True

    @nn.compact
    def __call__(self, x, labels, train=False):
        if x.ndim != 4:
            raise ValueError(f"energy_conv takes NHWC images [B, H, W, C], got shape {x.shape}; use energy_mlp for "
                             "vectors")
        m, act = self.config.model, nn.swish
        cond = _conditioning(labels, self.config)
        h = nn.Conv(m.nf, (3, 3), padding="SAME")(center_input(x, self.config))
        for mult in m.get("ch_mult", (1, 2, 2)):
            h = nn.Conv(m.nf * mult, (3, 3), padding="SAME")(act(h))
            if cond is not None:
                h = h + nn.Dense(m.nf * mult)(act(cond))[:, None, None, :]
            h = nn.Conv(m.nf * mult, (3, 3), strides=(2, 2), padding="SAME")(act(h))
        h = nn.Dense(2 * m.nf)(act(jnp.mean(h, axis=(1, 2))))
        h = nn.Dropout(m.get("dropout", 0.0), deterministic=not train)(h)
        energy = EnergyReadout(m.get("energy_quadratic", 0.0), m.get("energy_scale", 1.0))(act(h), x)
        return _finish(energy, labels, self.config)


# --- Energy functions and their conservative scores. ---

def get_energy_fn(sde, model, variables, train=False, continuous=True, rng=None):
    """energy_fn(x [B, ...], t [B]) -> E_θ(x, t) [B] from an energy network, conditioned on sde.noise_labels(t).

    A jax.tree_util.Partial whose arrays (variables, rng) are pytree leaves, like models.get_score_fn's.
    """
    if not getattr(model, "outputs_energy", False):
        raise ValueError(f"{type(model).__name__} outputs a score, not an energy; set config.model.name to an "
                         "energy network (energy_mlp or energy_conv)")
    return jax.tree_util.Partial(_NetworkEnergy(sde, model, bool(train), bool(continuous)), variables, rng)


@dataclasses.dataclass(frozen=True)
class _NetworkEnergy:
    sde: Any
    model: Any
    train: bool
    continuous: bool

    def __call__(self, variables, rng, x, t):
        return network_output(self.sde, self.model, self.train, self.continuous, variables, rng, x, t)


@dataclasses.dataclass(frozen=True)
class _ConservativeScore:
    """-∇x Σ_b E(x_b, t): per-example gradients, since the examples of a batch do not interact."""

    energy: Callable

    def __call__(self, *args, **kwargs):
        *bound, x, t = args
        return -jax.grad(lambda y: jnp.sum(self.energy(*bound, y, t, **kwargs)))(x)


def score_from_energy(energy_fn):
    """The conservative score s(x, t) = -∇x E(x, t) [B, ...] of an energy energy_fn(x, t) -> [B] (SPEC §6).

    A jax.tree_util.Partial carrying the energy's bound arrays, so jit-compiled samplers take new parameters
    without re-tracing when energy_fn is itself a Partial (get_energy_fn's is). `energy_from_score` inverts it.
    """
    if isinstance(energy_fn, jax.tree_util.Partial):
        return jax.tree_util.Partial(_ConservativeScore(energy_fn.func), *energy_fn.args, **energy_fn.keywords)
    return jax.tree_util.Partial(_ConservativeScore(energy_fn))


def is_energy_score(score_fn):
    """Whether score_fn was made by score_from_energy (so its energy can be recovered)."""
    return isinstance(score_fn, jax.tree_util.Partial) and isinstance(score_fn.func, _ConservativeScore)


def energy_from_score(score_fn):
    """The energy E(x, t) -> [B] behind a score made by score_from_energy (models.get_score_fn of an energy model).

    Objectives that need energy values (contrastive divergence, NCE) recover the energy this way from the score
    function the training loop hands them; any other score function raises a ValueError.
    """
    if not is_energy_score(score_fn):
        raise ValueError("this objective needs energy values, but the score function does not come from an energy "
                         "network; set config.model.name to energy_mlp or energy_conv")
    return jax.tree_util.Partial(score_fn.func.energy, *score_fn.args, **score_fn.keywords)
