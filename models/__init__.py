"""Score networks: a registry by name, and the adapter that turns a network into a score function.

Models are flax.linen modules called as pure functions `model.apply(variables, x, labels, train=...)`, where
`labels` is what the SDE says a network conditions on (`sde.noise_labels`). Importing this package registers
every model module listed at the bottom.
"""
import dataclasses
from typing import Any

import jax
import ml_collections

_MODELS = {}


def register_model(cls=None, *, name=None):
    """Class decorator: `@register_model(name="mlp")` makes the model constructible from config.model.name."""

    def register(c):
        key = name or c.__name__
        if key in _MODELS:
            raise ValueError(f"a model named {key!r} is already registered")
        _MODELS[key] = c
        return c

    return register if cls is None else register(cls)


def get_model(name):
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(_MODELS)}")
    return _MODELS[name]


def create_model(config):
    """The flax module named by config.model.name, configured by the (frozen) config."""
    return get_model(config.model.name)(config=ml_collections.FrozenConfigDict(config))


def get_score_fn(sde, model, variables, train=False, continuous=True, rng=None):
    """A score function (x [B, ...], t [B]) -> ∇x log p_t(x) made from a network, with the score-SDE conventions.

    VE networks condition on σ_t (continuous) or the level index and output the score (scaled by 1/σ inside the
    model where config.model.scale_by_sigma says so); VP / sub-VP networks condition on 999 t (continuous) or the
    level index and predict the noise, so the score is -output / σ_t. `rng` feeds dropout when train=True.

    It is returned as a jax.tree_util.Partial whose arrays (variables, rng) are pytree leaves and whose function is
    hashable, so jit-compiled samplers and likelihood solves take new parameters without re-tracing.
    An energy network (models/energy.py, SPEC §6) gives its conservative score -∇x E instead.
    """
    if getattr(model, "outputs_energy", False):
        return energy.score_from_energy(energy.get_energy_fn(sde, model, variables, train, continuous, rng))
    return jax.tree_util.Partial(_NetworkScore(sde, model, bool(train), bool(continuous)), variables, rng)


@dataclasses.dataclass(frozen=True)
class _NetworkScore:
    sde: Any
    model: Any
    train: bool
    continuous: bool

    def __call__(self, variables, rng, x, t):
        output = network_output(self.sde, self.model, self.train, self.continuous, variables, rng, x, t)
        return self.sde.output_to_score(output, t, self.continuous)


def network_output(sde, model, train, continuous, variables, rng, x, t):
    """model's raw output at (x, t): conditioned on sde.noise_labels(t), dropout fed by rng when train."""
    labels = sde.noise_labels(t, continuous)
    rngs = {"dropout": rng} if train and rng is not None else {}
    return model.apply(variables, x, labels, train=train, rngs=rngs)


from models import ddpm, energy, mlp, ncsn, ncsnpp, ncsnv2  # noqa: E402,F401  (registers the models)
