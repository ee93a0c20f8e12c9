"""Samplers: predictor-corrector (SPEC §7), the probability-flow ODE (SPEC §2, §7) and NCSN's annealed Langevin
dynamics (SPEC §6), all driven by a plain score function `score_fn(x [B, ...], t [B]) -> [B, ...]` and an SDE.

Predictors and correctors are pure step functions in two registries (`register_predictor`, `register_corrector`):
`step(rng, x, t, **options) -> (x, x_mean)`, where x_mean is the step without its noise (what the last step returns
when `denoise` asks for the noise-free sample). Every sampler returns `(x, nfe)`, nfe the number of score
evaluations per example.

Compilation: each sampler runs as one jit-compiled call (a `lax.fori_loop`, or one diffrax solve for the whole
batch), cached on the SDE object, the shape and the structural options. `score_fn` enters that call as a pytree:
pass a `jax.tree_util.Partial(fn, variables)` with a module-level `fn` and new parameters reuse the compiled
sampler; a plain closure works too, but compiles once per closure object.
"""
import dataclasses
import functools
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp

from sde_lib import as_pytree, batch_mul, check_eps


@dataclasses.dataclass(frozen=True)
class Step:
    """A registered predictor or corrector step and the number of score evaluations it makes."""

    fn: Callable
    nfe: int


_PREDICTORS = {}
_CORRECTORS = {}


def _register(registry, kind, name, nfe):
    def register(fn):
        if name in registry:
            raise ValueError(f"a {kind} named {name!r} is already registered")
        registry[name] = Step(fn, nfe)
        return fn

    return register


def register_predictor(*, name, nfe=1):
    """Decorator: `@register_predictor(name=...)` on `fn(rng, x, t, *, sde, score_fn, dt, probability_flow)`."""
    return _register(_PREDICTORS, "predictor", name, nfe)


def register_corrector(*, name, nfe=1):
    """Decorator: `@register_corrector(name=...)` on `fn(rng, x, t, *, sde, score_fn, snr)` (one corrector step)."""
    return _register(_CORRECTORS, "corrector", name, nfe)


def _lookup(registry, kind, name):
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


def get_predictor(name):
    return _lookup(_PREDICTORS, "predictor", name)


def get_corrector(name):
    return _lookup(_CORRECTORS, "corrector", name)


# --- Predictors (SPEC §7). ---
@register_predictor(name="euler_maruyama")
def euler_maruyama_predictor(rng, x, t, *, sde, score_fn, dt, probability_flow):
    """Euler-Maruyama on the reverse SDE (SPEC §2): x ← x + f̄ dt + ḡ sqrt(|dt|) z, dt < 0."""
    drift, diffusion = sde.reverse(score_fn, probability_flow).sde(x, t)
    x_mean = x + drift * dt
    return x_mean + batch_mul(diffusion * jnp.sqrt(-dt), jax.random.normal(rng, x.shape)), x_mean


def _reverse_diffusion_mean(sde, score_fn, x, t, probability_flow=False):
    """x - f̄ with (f̄, Ḡ) the SDE's own discretization of the reverse SDE at t (SPEC §2, §7)."""
    f, G = sde.reverse(score_fn, probability_flow).discretize(x, t)
    return x - f, G


@register_predictor(name="reverse_diffusion")
def reverse_diffusion_predictor(rng, x, t, *, sde, score_fn, dt, probability_flow):
    """Reverse diffusion (SPEC §7): x ← x - f̄ + Ḡ z with (f̄, Ḡ) = sde.reverse(score_fn).discretize(x, t)."""
    del dt  # the step is the SDE's discretization at level t
    x_mean, G = _reverse_diffusion_mean(sde, score_fn, x, t, probability_flow)
    return x_mean + batch_mul(G, jax.random.normal(rng, x.shape)), x_mean


@register_predictor(name="ancestral")
def ancestral_predictor(rng, x, t, *, sde, score_fn, dt, probability_flow):
    """Ancestral sampling (DDPM / SMLD, SPEC §7): x ← mean + std z from `sde.ancestral_step`."""
    del dt
    if probability_flow:
        raise ValueError("the ancestral predictor samples the reverse SDE; use probability_flow=False, or the "
                         "euler_maruyama / reverse_diffusion predictor for the probability-flow ODE")
    x_mean, std = sde.ancestral_step(x, t, score_fn(x, t))
    return x_mean + batch_mul(std, jax.random.normal(rng, x.shape)), x_mean


@register_predictor(name="none", nfe=0)
def no_predictor(rng, x, t, *, sde, score_fn, dt, probability_flow):
    """No predictor: corrector-only sampling."""
    return x, x


# --- Correctors (SPEC §7). ---
def _per_example_norm(v):
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1))


def _langevin_update(rng, x, score, step):
    """x_mean = x + ε s, x = x_mean + sqrt(2ε) z for per-example step sizes ε [B]."""
    x_mean = x + batch_mul(step, score)
    return x_mean + batch_mul(jnp.sqrt(2.0 * step), jax.random.normal(rng, x.shape)), x_mean


@register_corrector(name="langevin")
def langevin_corrector(rng, x, t, *, sde, score_fn, snr):
    """Langevin with the target signal-to-noise ratio r (SPEC §7): ε = 2 α (r ||z|| / ||s||)².

    ||z|| and ||s|| are per-example norms over all non-batch dimensions averaged over the batch (the score-SDE
    convention). Per-example ratios are not usable in low dimension: ||s|| → 0 near a mode makes ε explode there
    (in 2-D it destroys the samples). A batch whose scores are all exactly zero gets ε = 0 instead of a division by 0.
    """
    score = score_fn(x, t)
    noise_rng, step_rng = jax.random.split(rng)
    z_norm = jnp.mean(_per_example_norm(jax.random.normal(noise_rng, x.shape)))
    s_norm = jnp.mean(_per_example_norm(score))
    ratio = jnp.where(s_norm > 0, z_norm / jnp.where(s_norm > 0, s_norm, 1.0), 0.0)
    step = 2.0 * sde.langevin_alpha(t) * (snr * ratio) ** 2
    return _langevin_update(step_rng, x, score, step)


@register_corrector(name="ald")
def annealed_langevin_corrector(rng, x, t, *, sde, score_fn, snr):
    """Annealed Langevin as a corrector (SPEC §6, §7): ε = 2 α (r σ_t)², x ← x + ε s + sqrt(2ε) z."""
    step = 2.0 * sde.langevin_alpha(t) * (snr * sde.marginal_std(t)) ** 2
    return _langevin_update(rng, x, score_fn(x, t), step)


@register_corrector(name="none", nfe=0)
def no_corrector(rng, x, t, *, sde, score_fn, snr):
    """No corrector: predictor-only sampling."""
    return x, x


# --- Samplers. ---
def _batch_time(t, shape):
    return jnp.full(shape[:1], t, jnp.float32)


@functools.partial(jax.jit, static_argnames=("sde", "shape", "predictor", "corrector", "n_steps",
                                             "probability_flow", "denoise"))
def _pc_sample(rng, score_fn, snr, eps, *, sde, shape, predictor, corrector, n_steps, probability_flow, denoise):
    predict, correct = get_predictor(predictor).fn, get_corrector(corrector).fn
    timesteps = jnp.linspace(sde.T, eps, sde.N)
    dt = -(sde.T - eps) / sde.N

    def pc_step(i, carry):
        step_rng, x, _ = carry
        step_rng, c_rng, p_rng = jax.random.split(step_rng, 3)
        t = _batch_time(timesteps[i], shape)

        def correct_once(j, state):
            return correct(jax.random.fold_in(c_rng, j), state[0], t, sde=sde, score_fn=score_fn, snr=snr)

        x, _ = jax.lax.fori_loop(0, n_steps, correct_once, (x, x))
        x, x_mean = predict(p_rng, x, t, sde=sde, score_fn=score_fn, dt=dt, probability_flow=probability_flow)
        return step_rng, x, x_mean

    init_rng, loop_rng = jax.random.split(rng)
    x = sde.prior_sampling(init_rng, shape)
    _, x, x_mean = jax.lax.fori_loop(0, sde.N, pc_step, (loop_rng, x, x))
    return x_mean if denoise else x


def pc_sample(rng, sde, score_fn, shape, predictor="reverse_diffusion", corrector="langevin", snr=0.16,
              n_steps=1, probability_flow=False, denoise=True, eps=1e-3):
    """Predictor-corrector sampling (SPEC §7) from the prior at T to eps on the grid linspace(T, eps, sde.N).

    At each of the sde.N grid times: n_steps corrector steps, then one predictor step (the score-SDE order);
    Euler-Maruyama steps by dt = -(T - eps)/N. With denoise the last predictor step's noise-free mean is returned.
    Returns (x [shape], nfe) with nfe = N (predictor nfe + n_steps × corrector nfe) score evaluations.
    """
    check_eps(eps, sde.T)
    p, c = get_predictor(predictor), get_corrector(corrector)
    if int(n_steps) < 0:
        raise ValueError(f"n_steps (corrector steps per time step) must be >= 0, got {n_steps}")
    x = _pc_sample(rng, as_pytree(score_fn), jnp.float32(snr), jnp.float32(eps), sde=sde, shape=tuple(shape),
                   predictor=predictor, corrector=corrector, n_steps=int(n_steps),
                   probability_flow=bool(probability_flow), denoise=bool(denoise))
    return x, sde.N * (p.nfe + int(n_steps) * c.nfe)


def euler_sample(rng, sde, score_fn, shape, denoise=True, eps=1e-3):
    """Euler-Maruyama on the reverse SDE without a corrector: `pc_sample` with predictor="euler_maruyama"."""
    return pc_sample(rng, sde, score_fn, shape, predictor="euler_maruyama", corrector="none", denoise=denoise,
                     eps=eps)


# Adaptive Runge-Kutta solvers and their new score evaluations per attempted step: both have 7 stages whose last
# one is reused as the next step's first (FSAL), so a solve costs 6 × num_steps + 1 (the first stage at T).
# diffrax picks its own first step without evaluating the vector field when integrating backwards in time.
_ODE_SOLVERS = {"tsit5": (diffrax.Tsit5, 6), "dopri5": (diffrax.Dopri5, 6)}


def _ode_solver(name):
    if name not in _ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {name!r}; choose one of {sorted(_ODE_SOLVERS)}")
    return _ODE_SOLVERS[name]


@functools.partial(jax.jit, static_argnames=("sde", "shape", "solver", "rtol", "atol", "denoise", "max_steps"))
def _ode_sample(rng, score_fn, eps, *, sde, shape, solver, rtol, atol, denoise, max_steps):
    solver_cls, evals_per_step = _ode_solver(solver)
    rsde = sde.reverse(score_fn, probability_flow=True)

    def vector_field(t, x, args):
        return rsde.sde(x, _batch_time(t, shape))[0]

    sol = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), solver_cls(), t0=sde.T, t1=eps, dt0=None,
                              y0=sde.prior_sampling(rng, shape),
                              stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps)
    x, nfe = sol.ys[-1], evals_per_step * sol.stats["num_steps"] + 1
    if denoise:
        x = _reverse_diffusion_mean(sde, score_fn, x, _batch_time(eps, shape))[0]
        nfe = nfe + 1
    return x, nfe


def ode_sample(rng, sde, score_fn, shape, solver="tsit5", rtol=1e-5, atol=1e-5, eps=1e-3, denoise=False,
               max_steps=4096):
    """Integrates the probability-flow ODE (SPEC §2) from x_T ~ prior at T to eps with an adaptive solver (SPEC §7).

    One diffrax solve for the whole batch (the step size is controlled on the RMS error over the batch). With
    denoise, one reverse-diffusion step without noise at t = eps follows (x + σ² s for VE, as in score-SDE).
    Returns (x [shape], nfe) with nfe the exact number of score evaluations: 6 per attempted step (accepted or
    rejected) + 1, + 1 for the denoising step. Deterministic given rng (which only draws x_T).
    """
    check_eps(eps, sde.T)
    _ode_solver(solver)
    x, nfe = _ode_sample(rng, as_pytree(score_fn), jnp.float32(eps), sde=sde, shape=tuple(shape), solver=solver,
                         rtol=float(rtol), atol=float(atol), denoise=bool(denoise), max_steps=int(max_steps))
    return x, int(nfe)


def _uniform_init(rng, sde, shape):
    """NCSN's starting point: uniform noise on [0, 1]^D."""
    del sde
    return jax.random.uniform(rng, shape)


def _prior_init(rng, sde, shape):
    return sde.prior_sampling(rng, shape)


_ALD_INITS = {"prior": _prior_init, "uniform": _uniform_init}


def _noise_levels(sde):
    """The SDE's discrete noise levels σ_i, i = 0..N-1, increasing in i (level time sde.level_time(i))."""
    return sde.discrete_marginal(jnp.zeros((sde.N,)), jnp.arange(sde.N))[1]


@functools.partial(jax.jit, static_argnames=("sde", "shape", "n_steps_each", "denoise", "init"))
def _ald_sample(rng, score_fn, step_lr, *, sde, shape, n_steps_each, denoise, init):
    sigmas = _noise_levels(sde)
    sigma_last = sigmas[0]

    def step(k, carry):
        step_rng, x = carry
        step_rng, now = jax.random.split(step_rng)
        level = sde.N - 1 - k // n_steps_each
        alpha = step_lr * (sigmas[level] / sigma_last) ** 2
        score = score_fn(x, _batch_time(sde.level_time(level), shape))
        return step_rng, x + 0.5 * alpha * score + jnp.sqrt(alpha) * jax.random.normal(now, shape)

    init_rng, loop_rng = jax.random.split(rng)
    x = _ALD_INITS[init](init_rng, sde, shape)
    _, x = jax.lax.fori_loop(0, sde.N * n_steps_each, step, (loop_rng, x))
    if denoise:
        x = x + sigma_last**2 * score_fn(x, _batch_time(sde.level_time(0), shape))
    return x


def ald_sample(rng, sde, score_fn, shape, step_lr=2e-5, n_steps_each=100, denoise=True, init="prior"):
    """NCSN's annealed Langevin dynamics (SPEC §6) over the SDE's N discrete levels σ_N > ... > σ_1.

    For each level i (largest σ first, score evaluated at the level's time sde.level_time(i)): n_steps_each steps
    x ← x + (α_i/2) s + sqrt(α_i) z with α_i = step_lr σ_i²/σ_L², σ_L the smallest level; then optionally the
    denoising step x ← x + σ_L² s(x, σ_L). init: "prior" (x ~ sde's prior) or "uniform" (U[0, 1], as NCSN).
    The levels are sde.discrete_marginal's: a VESDE's discrete_sigmas (NCSN), or DDPM's for a VPSDE.
    Returns (x [shape], nfe = N n_steps_each + denoise).
    """
    if init not in _ALD_INITS:
        raise ValueError(f"unknown ALD init {init!r}; choose one of {sorted(_ALD_INITS)}")
    if int(n_steps_each) < 1:
        raise ValueError(f"n_steps_each (Langevin steps per noise level) must be >= 1, got {n_steps_each}")
    x = _ald_sample(rng, as_pytree(score_fn), jnp.float32(step_lr), sde=sde, shape=tuple(shape),
                    n_steps_each=int(n_steps_each), denoise=bool(denoise), init=init)
    return x, sde.N * int(n_steps_each) + int(bool(denoise))


_METHODS = {"pc": pc_sample, "ode": ode_sample, "ald": ald_sample, "euler": euler_sample}


def get_method(name):
    return _lookup(_METHODS, "sampling method", name)


def sample(rng, sde, score_fn, shape, method="pc", **kwargs):
    """Samples `shape` from the model with the named method ("pc" | "ode" | "ald" | "euler"); returns (x, nfe)."""
    return get_method(method)(rng, sde, score_fn, shape, **kwargs)


# How each method reads its options from config.sampling (optional fields fall back to the defaults shown).
_CONFIG_OPTIONS = {
    "pc": lambda s: dict(predictor=s.predictor, corrector=s.corrector, snr=s.snr, n_steps=s.n_steps_each,
                         probability_flow=s.get("probability_flow", False), denoise=s.noise_removal, eps=s.eps),
    "euler": lambda s: dict(denoise=s.noise_removal, eps=s.eps),
    "ode": lambda s: dict(solver=s.get("ode_solver", "tsit5"), rtol=s.get("ode_rtol", 1e-5),
                          atol=s.get("ode_atol", 1e-5), eps=s.eps, denoise=s.noise_removal),
    "ald": lambda s: dict(step_lr=s.get("step_lr", 2e-5), n_steps_each=s.n_steps_each, denoise=s.noise_removal,
                          init=s.get("ald_init", "prior")),
}


def get_sampling_fn(config, sde, shape):
    """fn(rng, score_fn) -> (x, nfe) for config.sampling.method with its options from config.sampling.

    Optional fields: probability_flow (pc), ode_solver / ode_rtol / ode_atol (ode), step_lr / ald_init (ald).
    """
    method = config.sampling.method
    sampler = get_method(method)
    options = _CONFIG_OPTIONS[method](config.sampling)
    shape = tuple(shape)
    return lambda rng, score_fn: sampler(rng, sde, score_fn, shape, **options)
