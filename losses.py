"""Training objectives as pure functions, the optimizer, and the train / eval step builders (SPEC §3).

Every objective takes a plain score function `score_fn(x, t)` and an SDE and returns a per-example loss [B],
so it can be checked against the Gaussian-mixture closed forms (SPEC §9) without a network.

Reduction convention (the score-SDE code's, stated once here): the squared error of one example is reduced
over its non-batch dimensions by the mean when `reduce_mean` is true, and by ½ · sum otherwise.

The step builders return pure functions; the caller jits them (with its shardings). The per-step randomness is
derived from the step count, key = fold_in(rng, state.step), so a run restarted at step k reproduces step k.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

import models
import sde_lib
from sde_lib import batch_mul


def _reduce(sq, reduce_mean):
    """Mean (reduce_mean) or ½ sum of sq [B, ...] over all but the batch axis -> [B]."""
    sq = sq.reshape(sq.shape[0], -1)
    return jnp.mean(sq, axis=1) if reduce_mean else 0.5 * jnp.sum(sq, axis=1)


# --- Denoising score matching and its weightings (SPEC §3). ---

@dataclasses.dataclass(frozen=True)
class Weighting:
    """How DSM samples t and weights the squared error: `importance` picks t ~ q(t) ∝ g²/σ², else t ~ U[eps, T];
    `error(sde, t, eps, std, score, z)` is the elementwise weighted error [B, ...] at the sampled t."""

    importance: bool
    error: Callable


def _sigma2_error(sde, t, eps, std, score, z):
    """λ = σ_t²: (σ_t s + z)², NCSN's weighting."""
    return (batch_mul(std, score) + z) ** 2


def _likelihood_error(sde, t, eps, std, score, z):
    """λ = g(t)²: g² (s + z/σ_t)², the weighting under which DSM bounds the NLL (seeds 000/001)."""
    return batch_mul(sde.diffusion_sq(t), (score + batch_mul(1.0 / std, z)) ** 2)


def _likelihood_importance_error(sde, t, eps, std, score, z):
    """t ~ q(t) = g²/(σ² Z) on [eps, T]: the weight g²/(σ² q (T - eps)) = Z/(T - eps) is a constant.

    E_{t~q}[Z/(T - eps) ||σ s + z||²] = E_{t~U[eps,T]}[g² ||s + z/σ||²] exactly, so this is the "likelihood"
    loss with lower variance. (score_flow multiplies by Z only, i.e. its loss is T - eps times larger.)
    """
    scale = sde.likelihood_importance_cum_weight(sde.T, eps) / (sde.T - eps)
    return scale * (batch_mul(std, score) + z) ** 2


WEIGHTINGS = {
    "sigma2": Weighting(importance=False, error=_sigma2_error),
    "likelihood": Weighting(importance=False, error=_likelihood_error),
    "likelihood_importance": Weighting(importance=True, error=_likelihood_importance_error),
}


def get_weighting(name):
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown DSM weighting {name!r}; set config.training.weighting to one of "
                         f"{sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name]


def dsm_loss(rng, sde, score_fn, x, weighting="sigma2", eps=1e-5, reduce_mean=False, t=None):
    """Per-example denoising score matching loss [B] (SPEC §3).

    x_t = m(t) x + σ_t z with z ~ N(0, I) and t ~ U[eps, T] (or q(t) for "likelihood_importance"); the loss is
    the reduced weighted error of s(x_t, t) against ∇ log p_0t(x_t | x) = -z/σ_t. Passing `t` [B] fixes the
    times (for tests and per-t curves); the error is then the chosen estimator's integrand at those t.
    """
    w = get_weighting(weighting)
    t_rng, z_rng = jax.random.split(rng)
    if t is None:
        t = sde.sample_time(t_rng, x.shape[0], eps, importance=w.importance)
    z = jax.random.normal(z_rng, x.shape, x.dtype)
    mean, std = sde.marginal_prob(x, t)
    score = score_fn(mean + batch_mul(std, z), t)
    return _reduce(w.error(sde, t, eps, std, score, z), reduce_mean)


def discrete_loss(rng, sde, score_fn, x, reduce_mean=False):
    """Per-example discrete-time loss [B]: SMLD's (VE) or DDPM's (VP), from the SDE's discrete levels.

    Level i ~ U{0..N-1}, (mean, std) = sde.discrete_marginal(x, i), x_i = mean + std z, and the loss is the
    reduced (std · s(x_i, t_i) + z)² with t_i = sde.level_time(i). With score_fn from
    models.get_score_fn(..., continuous=False) this is exactly
      VE: SMLD's σ_i²-weighted loss σ_i² (s + z/σ_i)², the network output being the score;
      VP: DDPM's ε-MSE (ε̂ - z)², since that adapter returns s = -ε̂ / sqrt(1 - ᾱ_i) = -ε̂ / std.
    (tests/test_losses.py checks both against the network's output.)
    """
    i_rng, z_rng = jax.random.split(rng)
    i = jax.random.randint(i_rng, x.shape[:1], 0, sde.N)
    mean, std = sde.discrete_marginal(x, i)
    z = jax.random.normal(z_rng, x.shape, x.dtype)
    score = score_fn(mean + batch_mul(std, z), sde.level_time(i))
    return _reduce((batch_mul(std, score) + z) ** 2, reduce_mean)


# --- Objectives: a registry, so new ones (FP regularizer, EBM objectives) plug into get_loss_fn. ---

_OBJECTIVES = {}


def register_objective(name):
    """Decorator for `objective(config, sde, score_fn, x, rng) -> (per-example loss [B], aux dict of scalars)`."""

    def register(fn):
        if name in _OBJECTIVES:
            raise ValueError(f"an objective named {name!r} is already registered")
        _OBJECTIVES[name] = fn
        return fn

    return register


@register_objective("dsm")
def _dsm_objective(config, sde, score_fn, x, rng):
    t = config.training
    return dsm_loss(rng, sde, score_fn, x, weighting=t.weighting, eps=t.eps, reduce_mean=t.reduce_mean), {}


@register_objective("discrete")
def _discrete_objective(config, sde, score_fn, x, rng):
    return discrete_loss(rng, sde, score_fn, x, reduce_mean=config.training.reduce_mean), {}


def _objective_name(config):
    """config.training.objective if set, else "dsm" (continuous) or "discrete" (SMLD / DDPM)."""
    default = "dsm" if config.training.continuous else "discrete"
    name = config.training.get("objective", default)
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; set config.training.objective to one of {sorted(_OBJECTIVES)}")
    return name


def get_loss_fn(config, sde, model, train=True):
    """loss_fn(params, batch, rng) -> (scalar loss, aux dict): the configured objective, mean over the batch.

    batch is the data array x [B, ...]. The network becomes a score function through models.get_score_fn with
    config.training.continuous; `train` switches dropout (fed by a key split from rng).
    """
    objective = _OBJECTIVES[_objective_name(config)]

    def loss_fn(params, batch, rng):
        dropout_rng, loss_rng = jax.random.split(rng)
        score_fn = models.get_score_fn(sde, model, {"params": params}, train=train,
                                       continuous=config.training.continuous, rng=dropout_rng)
        losses, aux = objective(config, sde, score_fn, batch, loss_rng)
        return jnp.mean(losses), aux

    return loss_fn


# --- Optimizer (score-SDE conventions). ---

def _adam(config, lr):
    """Adam with coupled L2 weight decay (grad + wd · param before the moments, as torch.optim.Adam)."""
    o = config.optim
    return optax.chain(optax.add_decayed_weights(o.weight_decay),
                       optax.scale_by_adam(b1=o.beta1, b2=0.999, eps=o.eps),
                       optax.scale_by_learning_rate(lr))


def _adamw(config, lr):
    """AdamW: decoupled weight decay, lr · (adam step + wd · param)."""
    o = config.optim
    return optax.adamw(lr, b1=o.beta1, b2=0.999, eps=o.eps, weight_decay=o.weight_decay)


_OPTIMIZERS = {"adam": _adam, "adamw": _adamw}


def lr_schedule(config):
    """lr · min(step / warmup, 1) (score-SDE's linear warmup; the first update, at step 0, has lr 0)."""
    lr, warmup = config.optim.lr, config.optim.warmup
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return lambda step: lr * jnp.minimum(step / warmup, 1.0)


def get_optimizer(config):
    """The optax optimizer named by config.optim.optimizer, after clipping the global gradient norm to
    config.optim.grad_clip (no clipping when grad_clip <= 0)."""
    name = config.optim.optimizer.lower()
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.optim.optimizer!r}; set config.optim.optimizer to one of "
                         f"{sorted(_OPTIMIZERS)}")
    opt = _OPTIMIZERS[name](config, lr_schedule(config))
    if config.optim.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), opt)
    return opt


# --- Train state and steps. ---

@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    ema_params: Any


def init_train_state(rng, config, model, input_shape):
    """Initial TrainState: model.init on a zero batch of input_shape [B, ...]; EMA starts as a copy of params.

    The labels are those training feeds the network (sde.noise_labels at t = T/2): σ, 999 t or, for discrete
    training, integer noise-level indices, which the NCSN family requires.
    """
    x = jnp.zeros(input_shape, jnp.float32)
    sde = sde_lib.get_sde(config)
    labels = sde.noise_labels(jnp.full(input_shape[:1], sde.T / 2), config.training.continuous)
    params = jax.jit(functools.partial(model.init, train=False))({"params": rng}, x, labels)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=get_optimizer(config).init(params),
                      ema_params=jax.tree.map(jnp.copy, params))


def _train_step(loss_fn, optimizer, ema_rate, state, batch, rng):
    """One update with key fold_in(rng, step); the state is returned unchanged when loss or gradient is not finite."""
    key = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, state.ema_params, params)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.float32), **aux}
    return new_state, metrics


def get_step_fn(loss_fn, optimizer, ema_rate, n_jitted_steps=1):
    """step_fn(state, batch, rng) -> (state, metrics), pure (the caller jits it).

    Each update: (loss, grad) by value_and_grad at key fold_in(rng, state.step), the optax update, then
    EMA ema ← r · ema + (1 - r) · params (with the new params) and step + 1. metrics: "loss", "grad_norm" (before
    clipping), "nonfinite" (1 when the loss or gradient was NaN/inf: the update was skipped and the loop should
    stop), plus the objective's aux values. With n_jitted_steps > 1 the batch is [n, B, ...], a lax.scan runs n
    updates, and the metrics are averaged over them ("nonfinite" is their maximum).
    """
    if n_jitted_steps < 1:
        raise ValueError(f"n_jitted_steps must be >= 1, got {n_jitted_steps}")

    def step_fn(state, batch, rng):
        if n_jitted_steps == 1:
            return _train_step(loss_fn, optimizer, ema_rate, state, batch, rng)
        if batch.shape[0] != n_jitted_steps:
            raise ValueError(f"with n_jitted_steps={n_jitted_steps} the batch needs a leading axis of that size, "
                             f"got shape {batch.shape}")
        state, metrics = jax.lax.scan(lambda s, b: _train_step(loss_fn, optimizer, ema_rate, s, b, rng),
                                      state, batch)
        averaged = {k: jnp.mean(v) for k, v in metrics.items()}
        return state, {**averaged, "nonfinite": jnp.max(metrics["nonfinite"])}

    return step_fn


def get_eval_fn(loss_fn):
    """eval_fn(state, batch, rng) -> {"loss": ...}: the loss of the EMA parameters on a batch, no update.
    Build loss_fn with get_loss_fn(..., train=False) so dropout is off."""

    def eval_fn(state, batch, rng):
        loss, aux = loss_fn(state.ema_params, batch, rng)
        return {"loss": loss, **aux}

    return eval_fn
