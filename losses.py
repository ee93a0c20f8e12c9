"""Training objectives as pure functions, the optimizer, and the train / eval step builders.

Sections: denoising score matching and its weightings (SPEC §3), the score Fokker-Planck regularizer (SPEC §5),
the SMLD / DDPM losses, the objective registry, optimizer and train steps, and the energy-based objectives (SPEC §6).
Every score-model objective takes a plain score function `score_fn(x, t)` and an SDE, the energy-based ones an
energy or score of x, and each returns a per-example loss [B], so it can be checked against closed forms (SPEC §9)
without a network.

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

import evaluation
import likelihood
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
    loss with lower variance. (score_flow's training loss is the plain ||σ s + z||², Z/(T - eps) ≈ 20-25 times
    smaller: the same Adam updates up to Adam's eps, but its gradient clipping at 1 acts at a different scale.)
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


def _dsm_with_points(rng, sde, score_fn, x, weighting, eps, reduce_mean, t):
    """(per-example DSM loss [B], x_t, t): dsm_loss and the points it evaluated the score at."""
    w = get_weighting(weighting)
    t_rng, z_rng = jax.random.split(rng)
    if t is None:
        t = sde.sample_time(t_rng, x.shape[0], eps, importance=w.importance)
    z = jax.random.normal(z_rng, x.shape, x.dtype)
    mean, std = sde.marginal_prob(x, t)
    x_t = mean + batch_mul(std, z)
    return _reduce(w.error(sde, t, eps, std, score_fn(x_t, t), z), reduce_mean), x_t, t


def dsm_loss(rng, sde, score_fn, x, weighting="sigma2", eps=1e-5, reduce_mean=False, t=None):
    """Per-example denoising score matching loss [B] (SPEC §3).

    x_t = m(t) x + σ_t z with z ~ N(0, I) and t ~ U[eps, T] (or q(t) for "likelihood_importance"); the loss is
    the reduced weighted error of s(x_t, t) against ∇ log p_0t(x_t | x) = -z/σ_t. Passing `t` [B] fixes the
    times (for tests and per-t curves); the error is then the chosen estimator's integrand at those t.
    """
    return _dsm_with_points(rng, sde, score_fn, x, weighting, eps, reduce_mean, t)[0]


# --- Score Fokker-Planck regularization (SPEC §5, seed 002). ---

FP_TIME_WEIGHTS = {"one": lambda sde, t: jnp.ones_like(t), "g2": lambda sde, t: sde.diffusion_sq(t)}
FP_PROBES = ("exact", "rademacher", "gaussian")


@dataclasses.dataclass(frozen=True)
class FPSettings:
    """The regularizer α · w(t) ||r(x_t, t)||² / D, applied where t_min ≤ t ≤ t_max (α = 0: off).

    probe "exact" takes the exact divergence ∇·s inside r (D Jacobian-vector products: small D); "rademacher" /
    "gaussian" one Hutchinson probe per example. FP-Diffusion's default for images is α = 0.15 (sony/fp-diffusion,
    configs/default_cifar10_configs.py, `alpha`), at the perturbed points x_t of the DSM term.
    """

    weight: float = 0.0
    time_weighting: str = "one"
    probe: str = "rademacher"
    t_min: float = 0.0
    t_max: float = 1.0


def _settings(config, section, cls):
    """cls (a dataclass of defaults) from the fields of config.training.<section> (absent: the defaults);
    ValueError listing the accepted fields for an unknown one."""
    given = dict(config.training.get(section, {}))
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(given) - set(names)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)} in config.training.{section}; it takes {names}")
    return cls(**given)


def fp_settings(config):
    """FPSettings from config.training.fp (absent: off); ValueError naming the field for a bad value."""
    fp = _settings(config, "fp", FPSettings)
    if fp.time_weighting not in FP_TIME_WEIGHTS:
        raise ValueError(f"config.training.fp.time_weighting must be one of {sorted(FP_TIME_WEIGHTS)}, "
                         f"got {fp.time_weighting!r}")
    if fp.probe not in FP_PROBES:
        raise ValueError(f"config.training.fp.probe must be one of {FP_PROBES}, got {fp.probe!r}")
    if fp.weight < 0 or fp.t_min > fp.t_max:
        raise ValueError(f"config.training.fp needs weight >= 0 and t_min <= t_max, got {fp}")
    return fp


def fp_penalty(rng, sde, score_fn, x_t, t, settings):
    """w(t) ||r(x_t, t)||² / D per example [B], 0 outside [t_min, t_max] (SPEC §5).

    r is the score-FPE residual of evaluation.fpe_residual_vector: ∂_t s by forward mode, the outer ∇_x by reverse
    mode, so its gradient in the parameters is a third derivative of the network, computed by autodiff.
    """
    exact = settings.probe == "exact"
    r = evaluation.fpe_residual_vector(rng, sde, score_fn, x_t, t, exact_divergence=exact,
                                       hutchinson_type="rademacher" if exact else settings.probe)
    inside = (t >= settings.t_min) & (t <= settings.t_max)
    weight = jnp.where(inside, FP_TIME_WEIGHTS[settings.time_weighting](sde, t), 0.0)
    return weight * jnp.mean(r.reshape(r.shape[0], -1) ** 2, axis=1)


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
_OBJECTIVE_STATES = {}

# The key under which a stateful objective's loss_fn returns its next state in aux (the train step writes it back).
NEXT_OBJECTIVE_STATE = "next_objective_state"


def register_objective(name, init_state=None):
    """Decorator for `objective(config, sde, score_fn, x, rng) -> (per-example loss [B], aux dict of scalars)`.

    A stateful objective (persistent CD's replay buffer) names `init_state(config, sde, rng, example_shape) -> pytree`
    and takes the state as a sixth argument, returning (loss [B], aux, next state); the state lives in
    TrainState.objective_state, checkpointed with the parameters.
    """

    def register(fn):
        if name in _OBJECTIVES:
            raise ValueError(f"an objective named {name!r} is already registered")
        _OBJECTIVES[name] = fn
        _OBJECTIVE_STATES[name] = init_state
        return fn

    return register


@register_objective("dsm")
def _dsm_objective(config, sde, score_fn, x, rng):
    """DSM with config.training.weighting, plus α times the score-FPE penalty at the same (x_t, t) when
    config.training.fp.weight = α > 0 (FP-Diffusion); aux then reports both terms' batch means."""
    c, fp = config.training, fp_settings(config)
    loss, x_t, t = _dsm_with_points(rng, sde, score_fn, x, c.weighting, c.eps, c.reduce_mean, None)
    if fp.weight == 0:
        return loss, {}
    penalty = fp_penalty(jax.random.fold_in(rng, 1), sde, score_fn, x_t, t, fp)
    return loss + fp.weight * penalty, {"dsm": jnp.mean(loss), "fp_penalty": jnp.mean(penalty)}


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
    name = _objective_name(config)
    if fp_settings(config).weight > 0 and name != "dsm":
        raise ValueError(f"config.training.fp.weight > 0 regularizes the continuous DSM objective only; the "
                         f"objective here is {name!r} (set training.continuous = True or fp.weight = 0)")
    objective, stateful = _OBJECTIVES[name], _OBJECTIVE_STATES[name] is not None

    def loss_fn(params, batch, rng, objective_state=None):
        dropout_rng, loss_rng = jax.random.split(rng)
        score_fn = models.get_score_fn(sde, model, {"params": params}, train=train,
                                       continuous=config.training.continuous, rng=dropout_rng)
        if not stateful:
            losses, aux = objective(config, sde, score_fn, batch, loss_rng)
            return jnp.mean(losses), aux
        losses, aux, next_state = objective(config, sde, score_fn, batch, loss_rng, objective_state)
        return jnp.mean(losses), {**aux, NEXT_OBJECTIVE_STATE: next_state}

    return loss_fn


def init_objective_state(config, sde, rng, example_shape):
    """The initial state of config's objective (None for the stateless ones)."""
    init_state = _OBJECTIVE_STATES[_objective_name(config)]
    return None if init_state is None else init_state(config, sde, rng, tuple(example_shape))


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
    objective_state: Any = None   # a stateful objective's state (persistent CD's ReplayBuffer), else None


def init_train_state(rng, config, model, input_shape):
    """Initial TrainState: model.init on a zero batch of input_shape [B, ...]; EMA starts as a copy of params;
    the objective's state (if any) from key fold_in(rng, 1).

    The labels are those training feeds the network (sde.noise_labels at t = T/2): σ, 999 t or, for discrete
    training, integer noise-level indices, which the NCSN family requires.
    """
    x = jnp.zeros(input_shape, jnp.float32)
    sde = sde_lib.get_sde(config)
    labels = sde.noise_labels(jnp.full(input_shape[:1], sde.T / 2), config.training.continuous)
    params = jax.jit(functools.partial(model.init, train=False))({"params": rng}, x, labels)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=get_optimizer(config).init(params),
                      ema_params=jax.tree.map(jnp.copy, params),
                      objective_state=init_objective_state(config, sde, jax.random.fold_in(rng, 1), input_shape[1:]))


def _train_step(loss_fn, optimizer, ema_rate, state, batch, rng):
    """One update with key fold_in(rng, step); the state is returned unchanged when loss or gradient is not finite."""
    key = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, state.objective_state)
    aux = dict(aux)
    objective_state = aux.pop(NEXT_OBJECTIVE_STATE, state.objective_state)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, state.ema_params, params)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                           objective_state=objective_state)
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
        loss, aux = loss_fn(state.ema_params, batch, rng, state.objective_state)
        aux = {k: v for k, v in aux.items() if k != NEXT_OBJECTIVE_STATE}
        return {"loss": loss, **aux}

    return eval_fn


# --- Energy-based models (SPEC §6, seed 003). ---
#
# p_θ(x) = exp(-E_θ(x)) / Z_θ. These functions model one density: they take an energy `energy_fn(x) -> [B]` or a
# score `score_fn(x) -> [B, ...]` of a batch whose examples do not interact, and return per-example losses [B]
# (reduced as the module docstring says). `at_time(fn, t)` binds a network's time argument; the registered "ebm_*"
# objectives bind t = config.training.eps, where an unconditional energy (the default) ignores it.

def _call_at(fn, t, x):
    return fn(x, jnp.full(x.shape[:1], t, x.dtype))


def at_time(fn, t):
    """x -> fn(x, t · 1_B) for a score or energy function fn(x, t), as a jax.tree_util.Partial whose leaves are fn's
    arrays, so stop_gradient_fn and jit see through it."""
    return jax.tree_util.Partial(_call_at, sde_lib.as_pytree(fn), jnp.asarray(t, jnp.float32))


def stop_gradient_fn(fn):
    """fn with every bound array stop-gradiented when fn is a jax.tree_util.Partial (models.get_score_fn, at_time and
    models.energy return one), so a loss differentiated in the parameters does not trace through the MCMC chains
    run with it; any other callable is returned unchanged (the chains' outputs are stopped either way)."""
    return jax.tree.map(jax.lax.stop_gradient, fn) if isinstance(fn, jax.tree_util.Partial) else fn


def _per_example_sq_norm(v):
    return jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1)


def _clip_per_example(g, max_norm):
    """g · min(1, max_norm / ||g||) per example; unchanged when max_norm <= 0."""
    if max_norm <= 0:
        return g
    norm = jnp.sqrt(_per_example_sq_norm(g))
    return batch_mul(jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30)), g)


def _energy_and_drift(energy_fn, x, grad_clip):
    """(E(x) [B], ∇x E(x) [B, ...] clipped per example to norm grad_clip) from one vector-Jacobian product."""
    energy, pullback = jax.vjp(energy_fn, x)
    return energy, _clip_per_example(pullback(jnp.ones_like(energy))[0], grad_clip)


def _log_proposal(x_to, x_from, grad_from, step_size):
    """log q(x_to | x_from) + const of the Langevin proposal N(x_from - (ε²/2) g(x_from), ε² I)."""
    return -_per_example_sq_norm(x_to - x_from + 0.5 * step_size**2 * grad_from) / (2.0 * step_size**2)


# Chains of up to this many steps are unrolled: XLA:CPU runs a convolution's input gradient about 5x slower inside
# a while loop than unrolled (energy_conv, batch 64: 100 vs 20 ms a Langevin step, jax 0.10.2); longer chains loop.
MAX_UNROLLED_STEPS = 32


def langevin_mcmc(rng, energy_fn, x, n_steps, step_size, grad_clip=0.0, mala=False):
    """n_steps Langevin steps from x [B, ...] for p ∝ exp(-E) (SPEC §6). Returns (x [B, ...], acceptance [B]).

    Step-size convention: ε is the noise scale, x ← x - (ε²/2) ∇x E(x) + ε z, z ~ N(0, I); this is the score-SDE
    corrector's x + ε' s + sqrt(2ε') z with ε' = ε²/2. The unadjusted chain (ULA) leaves an O(ε²) bias: for a Gaussian
    E = ½ (x-μ)ᵀP(x-μ) its stationary covariance is (P (I - ε²P/4))⁻¹. With `mala` each step is a Metropolis-
    Hastings proposal accepted with probability min(1, exp(E(x) - E(x')) q(x|x') / q(x'|x)), which keeps p_θ exactly
    invariant for any ε. grad_clip > 0 clips ∇x E to that norm per chain inside the drift; MALA's proposal density
    uses the same clipped drift, so the correction stays exact. acceptance is each chain's fraction of accepted
    proposals (1 for ULA). One energy-and-gradient evaluation per step. The chains are stop-gradiented: their
    output and the energy's parameters inside them carry no gradient.
    """
    if step_size <= 0 or int(n_steps) < 0:
        raise ValueError(f"langevin_mcmc needs step_size > 0 and n_steps >= 0, got {step_size}, {n_steps}")
    energy_fn = stop_gradient_fn(energy_fn)
    x = jax.lax.stop_gradient(x)
    energy, grad = _energy_and_drift(energy_fn, x, grad_clip)

    def step(i, carry):
        x, energy, grad, accepted = carry
        z_rng, u_rng = jax.random.split(jax.random.fold_in(rng, i))
        proposal = x - 0.5 * step_size**2 * grad + step_size * jax.random.normal(z_rng, x.shape, x.dtype)
        energy_p, grad_p = _energy_and_drift(energy_fn, proposal, grad_clip)
        if not mala:
            return proposal, energy_p, grad_p, accepted + 1.0
        log_ratio = (energy - energy_p + _log_proposal(x, proposal, grad_p, step_size)
                     - _log_proposal(proposal, x, grad, step_size))
        accept = jnp.log(jax.random.uniform(u_rng, energy.shape)) < log_ratio   # NaN / -inf ratios reject
        pick = lambda new, old: jnp.where(accept.reshape(accept.shape + (1,) * (new.ndim - 1)), new, old)
        return pick(proposal, x), pick(energy_p, energy), pick(grad_p, grad), accepted + accept

    carry = (x, energy, grad, jnp.zeros(x.shape[:1], x.dtype))
    unroll = int(n_steps) if 0 < int(n_steps) <= MAX_UNROLLED_STEPS else 1
    x, _, _, accepted = jax.lax.fori_loop(0, int(n_steps), step, carry, unroll=unroll)
    acceptance = accepted / int(n_steps) if n_steps else jnp.ones_like(accepted)
    return jax.lax.stop_gradient(x), acceptance


def _mle_terms(energy_fn, x_pos, x_neg, energy_reg):
    """(E(x⁺) - E(sg(x⁻)) + α (E(x⁺)² + E(x⁻)²) [B], aux of batch means)."""
    if x_pos.shape != x_neg.shape:
        raise ValueError(f"MCMC-MLE pairs data and negatives per example; got shapes {x_pos.shape} and {x_neg.shape}")
    e_pos, e_neg = energy_fn(x_pos), energy_fn(jax.lax.stop_gradient(x_neg))
    loss = e_pos - e_neg + energy_reg * (e_pos**2 + e_neg**2)
    return loss, {"energy_pos": jnp.mean(e_pos), "energy_neg": jnp.mean(e_neg)}


def mcmc_mle_loss(energy_fn, x_pos, x_neg, energy_reg=0.0):
    """MLE with MCMC (SPEC §6): E(x⁺) - E(stop_grad(x⁻)) per pair [B].

    Its θ-gradient, averaged, is ∇θ E(x⁺) - ∇θ E(x⁻), an unbiased estimate of the negative log-likelihood gradient
    ∇θ E(x⁺) + ∇θ log Z_θ = ∇θ E(x⁺) - E_{p_θ}[∇θ E] when x⁻ ~ p_θ. energy_reg = α > 0 adds α (E(x⁺)² + E(x⁻)²), the
    energy-magnitude regularizer of Du & Mordatch (2019), which keeps E from drifting when the sampler lags.
    """
    return _mle_terms(energy_fn, x_pos, x_neg, energy_reg)[0]


def contrastive_divergence_loss(rng, energy_fn, x, n_steps, step_size, grad_clip=0.0, mala=False, energy_reg=0.0):
    """CD-k (SPEC §6): chains start at the data batch x and run k = n_steps Langevin steps (langevin_mcmc); the loss
    is mcmc_mle_loss of x against them. Returns (loss [B], aux: mean energies of both sets and MALA acceptance)."""
    x_neg, acceptance = langevin_mcmc(rng, energy_fn, x, n_steps, step_size, grad_clip, mala)
    loss, aux = _mle_terms(energy_fn, x, x_neg, energy_reg)
    return loss, {**aux, "acceptance": jnp.mean(acceptance)}


@flax.struct.dataclass
class ReplayBuffer:
    """The state of persistent contrastive divergence: `samples` [N, ...], the current states of N persistent chains.

    It is a pytree the caller carries: persistent_cd_loss takes one and returns the next, so the whole step stays a
    pure function. The "ebm_pcd" objective keeps it in TrainState.objective_state (checkpointed with the parameters,
    so a resumed run continues the same chains); the train step writes back the buffer the loss returns through
    aux (NEXT_OBJECTIVE_STATE). N = B is the plain "persistent chains" PCD; N > B is a replay buffer as in Du &
    Mordatch (2019), who restart 5% of the chains from noise at each step (persistent_cd_loss's default reinit_prob).
    """

    samples: jax.Array


def init_replay_buffer(rng, init_fn, size, example_shape):
    """A ReplayBuffer of `size` chains drawn from init_fn(rng, (size, *example_shape))."""
    return ReplayBuffer(samples=init_fn(rng, (int(size),) + tuple(example_shape)))


def persistent_cd_loss(rng, energy_fn, x, buffer, init_fn, n_steps, step_size, reinit_prob=0.05, grad_clip=0.0,
                       mala=False, energy_reg=0.0):
    """Persistent CD with a replay buffer (SPEC §6). Returns (loss [B], the updated ReplayBuffer, aux).

    B distinct chains are drawn from the buffer (without replacement, so N >= B), each restarted with probability
    reinit_prob from init_fn(rng, shape) (the noise the buffer began with), advanced n_steps Langevin steps and
    written back; the loss is mcmc_mle_loss of the data batch x against them. aux adds "reinitialized", the
    fraction restarted.
    """
    size, batch = buffer.samples.shape[0], x.shape[0]
    if size < batch or buffer.samples.shape[1:] != x.shape[1:]:
        raise ValueError(f"the replay buffer holds chains of shape {buffer.samples.shape}; it needs at least the "
                         f"batch size {batch} chains shaped like the data {x.shape[1:]}")
    pick_rng, reinit_rng, init_rng, mcmc_rng = jax.random.split(rng, 4)
    index = jax.random.choice(pick_rng, size, (batch,), replace=False)
    restart = jax.random.bernoulli(reinit_rng, reinit_prob, (batch,))
    x0 = jnp.where(restart.reshape((batch,) + (1,) * (x.ndim - 1)), init_fn(init_rng, x.shape), buffer.samples[index])
    x_neg, acceptance = langevin_mcmc(mcmc_rng, energy_fn, x0, n_steps, step_size, grad_clip, mala)
    loss, aux = _mle_terms(energy_fn, x, x_neg, energy_reg)
    new_buffer = ReplayBuffer(samples=buffer.samples.at[index].set(x_neg))
    return loss, new_buffer, {**aux, "acceptance": jnp.mean(acceptance),
                              "reinitialized": jnp.mean(restart.astype(jnp.float32))}


def exact_score_matching_loss(score_fn, x):
    """Score matching ½ ||s(x)||² + tr(∇x s(x)) per example [B] (SPEC §6), the trace exact from D Jacobian-vector
    products (likelihood.divergence_exact: small D only). Its mean equals ½ E||s - ∇ log p||² minus a constant."""
    score, trace = likelihood.divergence_exact(score_fn, x)
    return 0.5 * _per_example_sq_norm(score) + trace


def sliced_score_matching_loss(rng, score_fn, x, n_slices=1, probe="gaussian", variance_reduced=False, probes=None):
    """Sliced score matching per example [B] (SPEC §6), averaged over n_slices projections v per example:
    vᵀ(∇x s)v + ½ (vᵀs)², or with `variance_reduced` vᵀ(∇x s)v + ½ ||s||² (its expectation over v, as E[v vᵀ] = I).

    Either has expectation over v equal to exact_score_matching_loss. v are "gaussian" or "rademacher" probes
    (evaluation.sample_probe), or the given `probes` [n_slices, B, ...]. One Jacobian-vector product per slice.
    """
    if probes is None:
        probes = evaluation.sample_probe(rng, (int(n_slices),) + x.shape, probe)

    def one_slice(v):
        score, vjv = likelihood.divergence_hutchinson(score_fn, x, v)
        if variance_reduced:
            return vjv + 0.5 * _per_example_sq_norm(score)
        return vjv + 0.5 * jnp.sum((v * score).reshape(x.shape[0], -1), axis=1) ** 2

    return jnp.mean(jax.vmap(one_slice)(probes), axis=0)


def denoising_score_matching_loss(rng, score_fn, x, sigma, reduce_mean=False):
    """Single-level denoising score matching per example [B] (SPEC §6): the reduced (s(x + σz) + z/σ)², z ~ N(0, I).

    The one-σ case of dsm_loss (VE, fixed t, weight 1 instead of σ²): it matches s to the score of p * N(0, σ² I),
    and with the ½-sum reduction its mean is that level's score-matching objective plus a constant.
    """
    z = jax.random.normal(rng, x.shape, x.dtype)
    return _reduce((score_fn(x + sigma * z) + z / sigma) ** 2, reduce_mean)


@dataclasses.dataclass(frozen=True)
class NoiseDistribution:
    """NCE's noise q: sample(rng, n) -> [n, ...] and log_prob(x [n, ...]) -> [n], both in data space."""

    sample: Callable
    log_prob: Callable


def gaussian_noise(mean, cov, shape=None):
    """q = N(mean, cov) over the flattened examples (mean [D], cov [D, D] positive definite), examples of `shape`
    (default (D,))."""
    mean, chol = jnp.asarray(mean), jnp.linalg.cholesky(jnp.asarray(cov))
    d = mean.shape[0]
    shape = (d,) if shape is None else tuple(shape)
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))

    def sample(rng, n):
        z = jax.random.normal(rng, (n, d), mean.dtype)
        return (mean + z @ chol.T).reshape((n,) + shape)

    def log_prob(x):
        w = jax.scipy.linalg.solve_triangular(chol, (x.reshape(x.shape[0], d) - mean).T, lower=True)
        return -0.5 * (d * jnp.log(2 * jnp.pi) + log_det + jnp.sum(w**2, axis=0))

    return NoiseDistribution(sample, log_prob)


def diagonal_gaussian_noise(mean, std):
    """q = N(mean, diag(std²)) with mean and std shaped like one example."""
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    def sample(rng, n):
        return mean + std * jax.random.normal(rng, (n,) + mean.shape, mean.dtype)

    def log_prob(x):
        return jnp.sum(jax.scipy.stats.norm.logpdf(x, mean, std).reshape(x.shape[0], -1), axis=1)

    return NoiseDistribution(sample, log_prob)


def fit_gaussian_noise(x, diagonal=False, jitter=1e-3):
    """A Gaussian q fitted to a batch x [B, ...] (stop-gradiented): full covariance (small D; B > D), or diagonal.

    jitter · (mean variance) is added to the variances so a degenerate batch still gives a proper density.
    """
    x = jax.lax.stop_gradient(x)
    flat = x.reshape(x.shape[0], -1)
    mean, var = jnp.mean(flat, axis=0), jnp.var(flat, axis=0, ddof=1)
    ridge = jitter * jnp.mean(var)
    if diagonal:
        return diagonal_gaussian_noise(mean.reshape(x.shape[1:]), jnp.sqrt(var + ridge).reshape(x.shape[1:]))
    cov = jnp.cov(flat, rowvar=False).reshape(flat.shape[1], flat.shape[1])
    return gaussian_noise(mean, cov + ridge * jnp.eye(flat.shape[1]), x.shape[1:])


def nce_loss(rng, energy_fn, x, noise, nu=1, log_normalizer=0.0):
    """Noise-contrastive estimation per data example [B] (SPEC §6) with ν = nu noise samples per data example.

    With log p_θ = -E_θ - c (c = log_normalizer: a learnable scalar; the energy networks of models/energy.py carry
    their own c inside E, so leave it 0 for them) and G(u) = log p_θ(u) - log q(u) - log ν, the log-odds that u is
    data rather than one of ν noise samples, the loss of data example b and its noise samples y_b1..y_bν ~ q is
    softplus(-G(x_b)) + Σ_j softplus(G(y_bj)). Its population minimiser over an unconstrained family is p_θ = p_data,
    which fixes c: NCE learns the normalizer that MCMC-MLE and score matching cannot see.
    """
    batch, nu = x.shape[0], int(nu)
    if nu < 1:
        raise ValueError(f"NCE needs nu >= 1 noise samples per data sample, got {nu}")
    y = noise.sample(rng, batch * nu)
    log_odds = lambda u: -energy_fn(u) - log_normalizer - noise.log_prob(u) - jnp.log(nu)
    noise_terms = jax.nn.softplus(log_odds(y)).reshape(batch, nu)
    return jax.nn.softplus(-log_odds(x)) + jnp.sum(noise_terms, axis=1)


# --- The EBM objectives for get_loss_fn (config.training.objective = "ebm_*", settings in config.training.ebm). ---

@dataclasses.dataclass(frozen=True)
class EBMSettings:
    """config.training.ebm: Langevin (CD-k) settings, SSM probes, the DSM level and NCE's noise.

    langevin_steps k and step_size ε (x ← x - (ε²/2)∇E + ε z), grad_clip (per-chain norm, 0 = off), mala, and
    energy_reg α for "ebm_cd" and "ebm_pcd"; for "ebm_pcd" also buffer_size N, reinit_prob and chain_init (a key of
    sde_lib.INITIAL_NOISE: where the buffer's and restarted chains begin); n_slices and probe ("gaussian" |
    "rademacher") for "ebm_ssm" / "ebm_ssm_vr"; sigma for
    "ebm_dsm"; nce_noise (a key of NCE_NOISES) and nce_ratio ν for "ebm_nce".
    """

    langevin_steps: int = 20
    step_size: float = 0.1
    grad_clip: float = 0.0
    mala: bool = False
    energy_reg: float = 0.0
    buffer_size: int = 10000
    reinit_prob: float = 0.05
    chain_init: str = "uniform"
    n_slices: int = 1
    probe: str = "gaussian"
    sigma: float = 0.1
    nce_noise: str = "fitted"
    nce_ratio: int = 1


SSM_PROBES = ("gaussian", "rademacher")

# NCE noise distributions made from the data batch: the batch's Gaussian (full covariance: small D; diagonal: images)
# or N(0, I). A batch-fitted q depends on the batch it classifies, which biases NCE by O(1/B).
NCE_NOISES = {
    "fitted": lambda x: fit_gaussian_noise(x),
    "fitted_diagonal": lambda x: fit_gaussian_noise(x, diagonal=True),
    "standard_normal": lambda x: diagonal_gaussian_noise(jnp.zeros(x.shape[1:]), jnp.ones(x.shape[1:])),
}


def ebm_settings(config):
    """EBMSettings from config.training.ebm (absent: the defaults); ValueError naming the field for a bad value."""
    e = _settings(config, "ebm", EBMSettings)
    if e.probe not in SSM_PROBES:
        raise ValueError(f"config.training.ebm.probe must be one of {SSM_PROBES}, got {e.probe!r}")
    if e.nce_noise not in NCE_NOISES:
        raise ValueError(f"config.training.ebm.nce_noise must be one of {sorted(NCE_NOISES)}, got {e.nce_noise!r}")
    if e.chain_init not in sde_lib.INITIAL_NOISE:
        raise ValueError(f"config.training.ebm.chain_init must be one of {sorted(sde_lib.INITIAL_NOISE)}, got "
                         f"{e.chain_init!r}")
    if not 0 <= e.reinit_prob <= 1:
        raise ValueError(f"config.training.ebm.reinit_prob must lie in [0, 1], got {e.reinit_prob}")
    if e.step_size <= 0 or e.sigma <= 0 or e.langevin_steps < 1 or e.n_slices < 1 or e.nce_ratio < 1:
        raise ValueError(f"config.training.ebm needs step_size, sigma > 0 and langevin_steps, n_slices, nce_ratio "
                         f">= 1, got {e}")
    return e


def _data_energy(config, score_fn):
    """The energy at the data end (t = training.eps) behind an energy network's score (ValueError otherwise)."""
    return at_time(models.energy.energy_from_score(score_fn), config.training.eps)


@register_objective("ebm_cd")
def _cd_objective(config, sde, score_fn, x, rng):
    e = ebm_settings(config)
    return contrastive_divergence_loss(rng, _data_energy(config, score_fn), x, e.langevin_steps, e.step_size,
                                       e.grad_clip, e.mala, e.energy_reg)


def _chain_init(settings, sde):
    """init_fn(rng, shape) of the chains persistent CD starts from noise."""
    return lambda rng, shape: sde_lib.initial_noise(settings.chain_init, rng, sde, shape)


def _init_replay_buffer(config, sde, rng, example_shape):
    e = ebm_settings(config)
    return init_replay_buffer(rng, _chain_init(e, sde), e.buffer_size, example_shape)


@register_objective("ebm_pcd", init_state=_init_replay_buffer)
def _pcd_objective(config, sde, score_fn, x, rng, buffer):
    e = ebm_settings(config)
    loss, buffer, aux = persistent_cd_loss(rng, _data_energy(config, score_fn), x, buffer, _chain_init(e, sde),
                                           e.langevin_steps, e.step_size, e.reinit_prob, e.grad_clip, e.mala,
                                           e.energy_reg)
    return loss, aux, buffer


@register_objective("ebm_sm")
def _sm_objective(config, sde, score_fn, x, rng):
    return exact_score_matching_loss(at_time(score_fn, config.training.eps), x), {}


@register_objective("ebm_ssm")
def _ssm_objective(config, sde, score_fn, x, rng):
    e = ebm_settings(config)
    return sliced_score_matching_loss(rng, at_time(score_fn, config.training.eps), x, e.n_slices, e.probe), {}


@register_objective("ebm_ssm_vr")
def _ssm_vr_objective(config, sde, score_fn, x, rng):
    e = ebm_settings(config)
    return sliced_score_matching_loss(rng, at_time(score_fn, config.training.eps), x, e.n_slices, e.probe,
                                      variance_reduced=True), {}


@register_objective("ebm_dsm")
def _ebm_dsm_objective(config, sde, score_fn, x, rng):
    e = ebm_settings(config)
    return denoising_score_matching_loss(rng, at_time(score_fn, config.training.eps), x, e.sigma,
                                         config.training.reduce_mean), {}


@register_objective("ebm_nce")
def _nce_objective(config, sde, score_fn, x, rng):
    e = ebm_settings(config)
    return nce_loss(rng, _data_energy(config, score_fn), x, NCE_NOISES[e.nce_noise](x), e.nce_ratio), {}
