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
import numpy as np

from sde_lib import VESDE, VPSDE, as_pytree, batch_mul, check_eps, initial_noise, subVPSDE


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


# --- The probability-flow ODE (SPEC §2, §7): solvers, time grids, one diffrax solve. ---
@dataclasses.dataclass(frozen=True)
class OdeSolver:
    """A diffrax solver for the probability-flow ODE; a solve costs initial + per_step × num_steps evaluations.

    adaptive: step size from a PIDController (rtol, atol); otherwise fixed steps on a time grid (`time_grid`).
    """

    solver: type
    per_step: int
    initial: int
    adaptive: bool


_ODE_SOLVERS = {}


def register_ode_solver(name, solver, *, per_step, initial, adaptive):
    """Registers a diffrax solver class under `name` with its score evaluations per step and before the first."""
    if name in _ODE_SOLVERS:
        raise ValueError(f"an ODE solver named {name!r} is already registered")
    _ODE_SOLVERS[name] = OdeSolver(solver, per_step, initial, adaptive)


def get_ode_solver(name):
    return _lookup(_ODE_SOLVERS, "ODE solver", name)


# Counts read from diffrax 0.7 and checked by counting calls (tests/test_sampling.py). Fixed steps: Euler 1 stage;
# Heun (trapezoidal predictor-corrector) and the explicit midpoint rule 2 stages each, not first-same-as-last
# (Heun's last stage is at (t + h, x + h k1), not at the new point), so 2 per step and 2N in all (EDM's 2N - 1
# skips the correction of a last step that ends at σ = 0; these grids end at eps > 0). Adaptive: Tsit5 and Dopri5
# have 7 stages whose last is reused as the next step's first (FSAL): 6 per attempted step, accepted or rejected,
# + 1 for the first stage at T; diffrax picks its first step size without evaluating the field when integrating
# backwards in time.
register_ode_solver("euler", diffrax.Euler, per_step=1, initial=0, adaptive=False)
register_ode_solver("heun", diffrax.Heun, per_step=2, initial=0, adaptive=False)
register_ode_solver("midpoint", diffrax.Midpoint, per_step=2, initial=0, adaptive=False)
register_ode_solver("tsit5", diffrax.Tsit5, per_step=6, initial=1, adaptive=True)
register_ode_solver("dopri5", diffrax.Dopri5, per_step=6, initial=1, adaptive=True)


def noise_to_signal(sde, t):
    """σ̃(t) = σ_t / m(t), EDM's σ (Karras et al. 2022): x_t / m(t) = x_0 + σ̃(t) z. Increasing in t."""
    return sde.marginal_std(t) / sde.mean_coef(t)


def _ve_noise_to_signal_inverse(sde, sigma):
    """VE: σ̃ = σ_min (σ_max/σ_min)^t  ⇒  t = log(σ̃/σ_min) / log(σ_max/σ_min)."""
    return jnp.log(sigma / sde.sigma_min) / sde.log_ratio


def _vp_noise_to_signal_inverse(sde, sigma):
    """VP: σ̃² = (1 - e^{-B}) / e^{-B} = e^B - 1  ⇒  B = log(1 + σ̃²), t = B⁻¹(B) (a quadratic, SPEC §1)."""
    return sde._integrated_beta_inverse(jnp.log1p(sigma**2))


def _subvp_noise_to_signal_inverse(sde, sigma):
    """sub-VP: σ̃ = (1 - e^{-B}) e^{B/2} = 2 sinh(B/2)  ⇒  B = 2 arcsinh(σ̃/2), t = B⁻¹(B)."""
    return sde._integrated_beta_inverse(2.0 * jnp.arcsinh(0.5 * sigma))


def _bisection_noise_to_signal_inverse(sde, sigma, iterations=40):
    """Any SDE whose σ̃(t) increases on [0, T]: bisection on [0, T] (40 halvings: 1e-12 T, below float32's ulp)."""
    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        below = noise_to_signal(sde, mid) < sigma
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros_like(sigma), jnp.full_like(sigma, sde.T)))
    return 0.5 * (lo + hi)


# Closed-form inverses of σ̃(t) by exact SDE class: a subclass may change the schedules (sub-VP is a VPSDE with its
# own σ_t), so it gets the bisection unless it registers its own.
_NOISE_TO_SIGNAL_INVERSES = {VESDE: _ve_noise_to_signal_inverse, VPSDE: _vp_noise_to_signal_inverse,
                             subVPSDE: _subvp_noise_to_signal_inverse}


def noise_to_signal_inverse(sde, sigma):
    """The t with σ̃(t) = sigma: closed form for VE / VP / sub-VP, bisection for any other SDE."""
    inverse = _NOISE_TO_SIGNAL_INVERSES.get(type(sde), _bisection_noise_to_signal_inverse)
    return inverse(sde, jnp.asarray(sigma, jnp.float32))


def edm_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. (2022), eq. 5: σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, i = 0..n-1."""
    frac = jnp.arange(n, dtype=jnp.float32) / (n - 1)
    inv_rho = 1.0 / rho
    return (sigma_max**inv_rho + frac * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


def _uniform_times(sde, n_steps, eps, rho):
    """n_steps equal steps in t from T to eps."""
    del rho
    return jnp.linspace(sde.T, eps, n_steps + 1)


def _edm_times(sde, n_steps, eps, rho):
    """EDM's schedule: edm_sigmas between σ̃(eps) and σ̃(T), mapped back to t; the end points are exactly T, eps."""
    sigmas = edm_sigmas(noise_to_signal(sde, eps), noise_to_signal(sde, jnp.float32(sde.T)), n_steps + 1, rho)
    t = noise_to_signal_inverse(sde, sigmas)
    return t.at[0].set(sde.T).at[-1].set(eps)


_TIME_SCHEDULES = {"uniform": _uniform_times, "edm": _edm_times}


def time_grid(sde, n_steps, eps=1e-3, schedule="uniform", rho=7.0):
    """The n_steps + 1 decreasing times T = t_0 > ... > t_n = eps of a fixed-step ODE solve.

    schedule: "uniform" in t, or "edm" (Karras et al. 2022, ρ = rho): EDM's σ is the noise-to-signal ratio
    σ̃(t) = σ_t / m(t) (`noise_to_signal`), spaced by `edm_sigmas` and mapped back by `noise_to_signal_inverse`.
    """
    check_eps(eps, sde.T)
    times = _lookup(_TIME_SCHEDULES, "time schedule", schedule)
    if int(n_steps) < 1:
        raise ValueError(f"n_steps (fixed ODE steps) must be >= 1, got {n_steps}")
    return times(sde, int(n_steps), jnp.float32(eps), jnp.float32(rho))


@functools.partial(jax.jit, static_argnames=("sde", "shape", "solver", "rtol", "atol", "denoise", "max_steps"))
def _ode_sample(rng, score_fn, eps, ts, *, sde, shape, solver, rtol, atol, denoise, max_steps):
    spec = get_ode_solver(solver)
    rsde = sde.reverse(score_fn, probability_flow=True)

    def vector_field(t, x, args):
        return rsde.sde(x, _batch_time(t, shape))[0]

    if spec.adaptive:
        t0, t1, controller = sde.T, eps, diffrax.PIDController(rtol=rtol, atol=atol)
    else:
        t0, t1, controller = ts[0], ts[-1], diffrax.StepTo(ts)
    sol = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), spec.solver(), t0=t0, t1=t1, dt0=None,
                              y0=sde.prior_sampling(rng, shape), stepsize_controller=controller, max_steps=max_steps)
    x, nfe = sol.ys[-1], spec.initial + spec.per_step * sol.stats["num_steps"]
    if denoise:
        x = _reverse_diffusion_mean(sde, score_fn, x, _batch_time(eps, shape))[0]
        nfe = nfe + 1
    return x, nfe


def ode_sample(rng, sde, score_fn, shape, solver="tsit5", rtol=1e-5, atol=1e-5, eps=1e-3, denoise=False,
               max_steps=4096, n_steps=30, schedule="uniform", rho=7.0):
    """Integrates the probability-flow ODE (SPEC §2) from x_T ~ prior at T to eps (SPEC §7) in one diffrax solve.

    solver: adaptive "tsit5" | "dopri5" (rtol, atol; the step size is controlled on the RMS error over the batch;
    max_steps caps the attempts), or fixed-step "euler" | "heun" | "midpoint" with n_steps steps on
    `time_grid(sde, n_steps, eps, schedule, rho)`. Options of the other kind are ignored. With denoise, one
    reverse-diffusion step without noise at t = eps follows (x + σ² s for VE, as in score-SDE).
    Returns (x [shape], nfe), nfe the exact number of score evaluations: Euler n_steps, Heun and midpoint
    2 n_steps, Tsit5 / Dopri5 6 per attempted step + 1; + 1 for denoise. Deterministic given rng (only x_T is drawn).
    The time grid enters the compiled solve as an array: schedules and ρ of the same n_steps share one compilation.
    """
    check_eps(eps, sde.T)
    if get_ode_solver(solver).adaptive:
        ts, static = None, dict(rtol=float(rtol), atol=float(atol), max_steps=int(max_steps))
    else:
        ts, static = time_grid(sde, n_steps, eps, schedule, rho), dict(rtol=None, atol=None, max_steps=int(n_steps))
    x, nfe = _ode_sample(rng, as_pytree(score_fn), jnp.float32(eps), ts, sde=sde, shape=tuple(shape), solver=solver,
                         denoise=bool(denoise), **static)
    return x, int(nfe)


@functools.partial(jax.jit, static_argnames=("sde", "shape", "n_steps", "denoise"))
def _edm_sample(rng, score_fn, eps, rho, churn, churn_range, noise_scale, *, sde, shape, n_steps, denoise):
    sigma_max = noise_to_signal(sde, jnp.float32(sde.T))
    sigmas = edm_sigmas(noise_to_signal(sde, eps), sigma_max, n_steps + 1, rho).at[0].set(sigma_max)
    gamma = jnp.minimum(churn / n_steps, jnp.sqrt(2.0) - 1.0)

    def denoised(y, sigma):
        """E[x_0 | y] = y + σ̃² ∇_y log p(y) with ∇_y = m ∇_x, the model's estimate of the clean data."""
        t = noise_to_signal_inverse(sde, sigma)
        m = sde.mean_coef(t)
        return y + sigma**2 * m * score_fn(m * y, _batch_time(t, shape))

    def step(i, carry):
        y, step_rng = carry
        step_rng, now = jax.random.split(step_rng)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        churned = (churn_range[0] <= sigma) & (sigma <= churn_range[1])
        sigma_hat = jnp.minimum(sigma * (1.0 + jnp.where(churned, gamma, 0.0)), sigma_max)
        y_hat = y + noise_scale * jnp.sqrt(jnp.maximum(sigma_hat**2 - sigma**2, 0.0)) * jax.random.normal(now, shape)
        slope = (y_hat - denoised(y_hat, sigma_hat)) / sigma_hat
        y_euler = y_hat + (sigma_next - sigma_hat) * slope
        slope_next = (y_euler - denoised(y_euler, sigma_next)) / sigma_next
        return y_hat + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next), step_rng

    # x_T from rng itself, as ode_sample draws it: with churn = 0 both solve the same ODE from the same point.
    y = sde.prior_sampling(rng, shape) / sde.mean_coef(jnp.float32(sde.T))
    y, _ = jax.lax.fori_loop(0, n_steps, step, (y, jax.random.fold_in(rng, 1)))
    return denoised(y, sigmas[-1]) if denoise else y * sde.mean_coef(eps)


def edm_sample(rng, sde, score_fn, shape, n_steps=18, churn=40.0, churn_range=(0.05, 50.0), noise_scale=1.003,
               rho=7.0, eps=1e-3, denoise=True):
    """Karras et al. (2022)'s stochastic sampler (their Algorithm 2) on any SDE, in y = x / m(t) against EDM's σ̃(t):
    y = x_0 + σ̃ z and dy/dσ̃ = (y - D(y))/σ̃ with D(y) = y + σ̃² m s(m y, t), the model's clean-data estimate.

    n_steps second-order (Heun) steps on edm_sigmas(σ̃(eps), σ̃(T), n_steps + 1, rho); before each step with σ̃_i in
    churn_range, noise lifts σ̃_i to σ̂ = (1 + γ) σ̃_i, γ = min(churn / n_steps, √2 - 1) (capped at σ̃(T)), scaled by
    noise_scale (S_noise). churn = 0 is the deterministic Heun solve of the probability-flow ODE. The defaults are
    EDM's ImageNet-64 values (S_churn 40, S_tmin 0.05, S_tmax 50, S_noise 1.003). With denoise, the result is D at
    σ̃(eps) (Tweedie's denoising step, as EDM's last step to σ = 0); otherwise x at eps.
    Returns (x [shape], nfe = 2 n_steps + denoise).
    """
    check_eps(eps, sde.T)
    if int(n_steps) < 1 or float(churn) < 0 or float(noise_scale) < 0:
        raise ValueError(f"the EDM sampler needs n_steps >= 1, churn >= 0 and noise_scale >= 0, got {n_steps}, "
                         f"{churn} and {noise_scale}")
    low, high = (float(v) for v in churn_range)
    x = _edm_sample(rng, as_pytree(score_fn), jnp.float32(eps), jnp.float32(rho), jnp.float32(churn),
                    jnp.array([low, high], jnp.float32), jnp.float32(noise_scale), sde=sde, shape=tuple(shape),
                    n_steps=int(n_steps), denoise=bool(denoise))
    return x, 2 * int(n_steps) + int(bool(denoise))


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
    x = initial_noise(init, init_rng, sde, shape)
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
    if int(n_steps_each) < 1:
        raise ValueError(f"n_steps_each (Langevin steps per noise level) must be >= 1, got {n_steps_each}")
    x = _ald_sample(rng, as_pytree(score_fn), jnp.float32(step_lr), sde=sde, shape=tuple(shape),
                    n_steps_each=int(n_steps_each), denoise=bool(denoise), init=init)
    return x, sde.N * int(n_steps_each) + int(bool(denoise))


@functools.partial(jax.jit, static_argnames=("sde", "shape", "n_steps", "init"))
def _langevin_sample(rng, score_fn, step_size, t, *, sde, shape, n_steps, init):
    init_rng, loop_rng = jax.random.split(rng)
    time = _batch_time(t, shape)

    step = jnp.full(shape[:1], 0.5 * step_size**2)   # _langevin_update's ε' = ε²/2: x + ε' s + sqrt(2ε') z

    def update(k, x):
        return _langevin_update(jax.random.fold_in(loop_rng, k), x, score_fn(x, time), step)[0]

    return jax.lax.fori_loop(0, n_steps, update, initial_noise(init, init_rng, sde, shape))


def langevin_sample(rng, sde, score_fn, shape, step_size=0.01, n_steps=100, init="uniform", eps=1e-5):
    """Langevin dynamics at the single time eps: the sampler of an energy-based model (SPEC §6, seed 003).

    n_steps unadjusted steps x ← x + (ε²/2) s(x, eps) + ε z, z ~ N(0, I), ε = step_size (the convention of
    losses.langevin_mcmc, which trains with the same chains), from sde_lib.INITIAL_NOISE[init]. It needs only the
    score, so it runs on any model; for an energy network s = -∇x E. Returns (x [shape], nfe = n_steps).
    """
    if int(n_steps) < 1 or float(step_size) <= 0:
        raise ValueError(f"Langevin sampling needs n_steps >= 1 and step_size > 0, got {n_steps} and {step_size}")
    check_eps(eps, sde.T)
    x = _langevin_sample(rng, as_pytree(score_fn), jnp.float32(step_size), jnp.float32(eps), sde=sde,
                         shape=tuple(shape), n_steps=int(n_steps), init=init)
    return x, int(n_steps)


_METHODS = {"pc": pc_sample, "ode": ode_sample, "edm": edm_sample, "ald": ald_sample, "euler": euler_sample,
            "langevin": langevin_sample}


def get_method(name):
    return _lookup(_METHODS, "sampling method", name)


def sample(rng, sde, score_fn, shape, method="pc", **kwargs):
    """Samples `shape` from the model with the named method ("pc" | "ode" | "edm" | "ald" | "euler" | "langevin");
    returns (x, nfe)."""
    return get_method(method)(rng, sde, score_fn, shape, **kwargs)


# How each method reads its options from config.sampling (optional fields fall back to the defaults shown).
_CONFIG_OPTIONS = {
    "pc": lambda s: dict(predictor=s.predictor, corrector=s.corrector, snr=s.snr, n_steps=s.n_steps_each,
                         probability_flow=s.get("probability_flow", False), denoise=s.noise_removal, eps=s.eps),
    "euler": lambda s: dict(denoise=s.noise_removal, eps=s.eps),
    "ode": lambda s: dict(solver=s.get("ode_solver", "tsit5"), rtol=s.get("ode_rtol", 1e-5),
                          atol=s.get("ode_atol", 1e-5), n_steps=s.get("ode_steps", 30),
                          schedule=s.get("ode_schedule", "uniform"), rho=s.get("ode_rho", 7.0), eps=s.eps,
                          denoise=s.noise_removal),
    "edm": lambda s: dict(n_steps=s.get("edm_steps", 18), churn=s.get("edm_churn", 40.0),
                          churn_range=s.get("edm_churn_range", (0.05, 50.0)), noise_scale=s.get("edm_noise", 1.003),
                          rho=s.get("ode_rho", 7.0), eps=s.eps, denoise=s.noise_removal),
    "ald": lambda s: dict(step_lr=s.get("step_lr", 2e-5), n_steps_each=s.n_steps_each, denoise=s.noise_removal,
                          init=s.get("ald_init", "prior")),
    "langevin": lambda s: dict(step_size=s.get("langevin_step_size", 0.01), n_steps=s.n_steps_each,
                               init=s.get("langevin_init", "uniform"), eps=s.eps),
}


def get_sampling_fn(config, sde, shape):
    """fn(rng, score_fn) -> (x, nfe) for config.sampling.method with its options from config.sampling.

    Optional fields: probability_flow (pc); ode_solver, ode_rtol / ode_atol (adaptive solvers), ode_steps /
    ode_schedule / ode_rho (fixed-step solvers) (ode); edm_steps, edm_churn, edm_churn_range, edm_noise and
    ode_rho (edm); step_lr / ald_init (ald); langevin_step_size / langevin_init (langevin, n_steps_each steps).
    """
    method = config.sampling.method
    sampler = get_method(method)
    options = _CONFIG_OPTIONS[method](config.sampling)
    shape = tuple(shape)
    return lambda rng, score_fn: sampler(rng, sde, score_fn, shape, **options)


# --- Controllable generation (score-SDE paper, Song et al. 2021, Appendix I; SPEC §7). ---
# The paper's orthogonal colour transform: its first column is the unit grey axis (1, 1, 1)/√3, so the first
# decorrelated coordinate of an RGB pixel is √3 × its grey level (the mean of R, G, B) and the other two, the unit
# vectors (-2, 1, 1)/√6 and (0, 1, -1)/√2 orthogonal to it, carry the colour. x ↦ x M on the channel axis; M⁻¹ = Mᵀ.
COLOR_DECORRELATION = np.array([[1.0 / np.sqrt(3.0), -2.0 / np.sqrt(6.0), 0.0],
                                [1.0 / np.sqrt(3.0), 1.0 / np.sqrt(6.0), 1.0 / np.sqrt(2.0)],
                                [1.0 / np.sqrt(3.0), 1.0 / np.sqrt(6.0), -1.0 / np.sqrt(2.0)]], np.float32)


def _to_latent(x, transform):
    return jnp.einsum("...i,ij->...j", x, transform)


def _from_latent(z, transform):
    return jnp.einsum("...j,ij->...i", z, transform)


@functools.partial(jax.jit, static_argnames=("sde", "predictor", "corrector", "n_steps", "probability_flow",
                                             "denoise"))
def _pc_inpaint(rng, score_fn, data, mask, transform, snr, eps, *, sde, predictor, corrector, n_steps,
                probability_flow, denoise):
    predict, correct = get_predictor(predictor).fn, get_corrector(corrector).fn
    timesteps = jnp.linspace(sde.T, eps, sde.N)
    dt = -(sde.T - eps) / sde.N
    known = _to_latent(data, transform)

    def impose(rng, x, t):
        """The known latent coordinates ← a sample of p_0t(· | known) at t; the others kept."""
        mean, std = sde.marginal_prob(known, t)
        noisy = mean + batch_mul(std, jax.random.normal(rng, known.shape))
        return _from_latent(jnp.where(mask, noisy, _to_latent(x, transform)), transform)

    def step(i, carry):
        step_rng, x, _ = carry
        step_rng, c_rng, p_rng, impose_rng = jax.random.split(step_rng, 4)
        t = _batch_time(timesteps[i], data.shape)

        def correct_once(j, x):
            j_rng, j_impose_rng = jax.random.split(jax.random.fold_in(c_rng, j))
            return impose(j_impose_rng, correct(j_rng, x, t, sde=sde, score_fn=score_fn, snr=snr)[0], t)

        x = jax.lax.fori_loop(0, n_steps, correct_once, x)
        x, x_mean = predict(p_rng, x, t, sde=sde, score_fn=score_fn, dt=dt, probability_flow=probability_flow)
        t_next = _batch_time(timesteps[jnp.minimum(i + 1, sde.N - 1)], data.shape)
        return step_rng, impose(impose_rng, x, t_next), x_mean

    init_rng, impose_rng, loop_rng = jax.random.split(rng, 3)
    x = impose(impose_rng, sde.prior_sampling(init_rng, data.shape), _batch_time(sde.T, data.shape))
    _, x, x_mean = jax.lax.fori_loop(0, sde.N, step, (loop_rng, x, x))
    x = x_mean if denoise else x
    return _from_latent(jnp.where(mask, known, _to_latent(x, transform)), transform)


def _check_inpainting_inputs(data, mask, transform):
    channels = data.shape[-1]
    if transform.shape != (channels, channels):
        raise ValueError(f"transform must be a {channels}x{channels} matrix acting on the last axis of data "
                         f"{data.shape}, got shape {transform.shape}")
    if not np.allclose(transform @ transform.T, np.eye(channels), atol=1e-5):
        raise ValueError("transform must be orthogonal (M Mᵀ = I), so that the forward SDE's isotropic noise stays "
                         "isotropic in its coordinates; orthonormalize it, e.g. with np.linalg.qr")
    try:
        broadcast = np.broadcast_shapes(mask.shape, data.shape)
    except ValueError:
        broadcast = None
    if broadcast != data.shape:
        raise ValueError(f"mask {mask.shape} must broadcast to the data's shape {data.shape}")


def inpaint(rng, sde, score_fn, data, mask, transform=None, predictor="reverse_diffusion", corrector="langevin",
            snr=0.16, n_steps=1, probability_flow=False, denoise=True, eps=1e-3):
    """PC sampling of the unknown part of `data` given its known part (score-SDE paper, Appendix I; SPEC §7).

    mask (broadcastable to data, True / 1 = known) selects coordinates of the latent z = data M, M = transform
    (orthogonal, acting on the last axis; None: the identity, i.e. plain inpainting of data's own coordinates).
    The PC loop of `pc_sample` runs on the whole x; after every corrector step at t_i and every predictor step
    (which brings x from t_i to t_{i+1}) the known latent coordinates are replaced by a fresh sample of
    p_0t(· | known) = N(m(t) z_known, σ_t² I) at the time x has then reached (score-SDE's code uses t_i for both);
    x starts from the prior with its known part diffused to T, and the result carries the known part exactly.
    This replacement conditions the score on a noisy copy of the known part, not on the known part itself: it is
    the paper's approximation p_t(x_unknown | known) ≈ p_t(x_unknown | noisy known), not exact at finite N.
    Returns (x [data.shape], nfe) with nfe as for `pc_sample`.
    """
    check_eps(eps, sde.T)
    data = jnp.asarray(data, jnp.float32)
    transform = np.eye(data.shape[-1], dtype=np.float32) if transform is None else np.asarray(transform, np.float32)
    mask = np.asarray(mask)
    _check_inpainting_inputs(data, mask, transform)
    p, c = get_predictor(predictor), get_corrector(corrector)
    if int(n_steps) < 0:
        raise ValueError(f"n_steps (corrector steps per time step) must be >= 0, got {n_steps}")
    x = _pc_inpaint(rng, as_pytree(score_fn), data, jnp.asarray(mask, bool), jnp.asarray(transform),
                    jnp.float32(snr), jnp.float32(eps), sde=sde, predictor=predictor, corrector=corrector,
                    n_steps=int(n_steps), probability_flow=bool(probability_flow), denoise=bool(denoise))
    return x, sde.N * (p.nfe + int(n_steps) * c.nfe)


@functools.partial(jax.jit, static_argnames=("sde", "n_steps_each", "denoise", "init"))
def _ald_inpaint(rng, score_fn, data, mask, transform, step_lr, *, sde, n_steps_each, denoise, init):
    sigmas = _noise_levels(sde)
    known = _to_latent(data, transform)

    def impose(x, y):
        return _from_latent(jnp.where(mask, y, _to_latent(x, transform)), transform)

    def level_steps(k, carry):
        level_rng, x = carry
        level_rng, y_rng, steps_rng = jax.random.split(level_rng, 3)
        level = sde.N - 1 - k
        y = known + sigmas[level] * jax.random.normal(y_rng, known.shape)  # ỹ = y + σ_i z, fixed for the level
        t = _batch_time(sde.level_time(level), data.shape)
        alpha = step_lr * (sigmas[level] / sigmas[0]) ** 2

        def langevin_step(j, x):
            z = jax.random.normal(jax.random.fold_in(steps_rng, j), data.shape)
            return impose(x + 0.5 * alpha * score_fn(x, t) + jnp.sqrt(alpha) * z, y)

        return level_rng, jax.lax.fori_loop(0, n_steps_each, langevin_step, impose(x, y))

    init_rng, loop_rng = jax.random.split(rng)
    x = initial_noise(init, init_rng, sde, data.shape)
    _, x = jax.lax.fori_loop(0, sde.N, level_steps, (loop_rng, x))
    if denoise:
        x = x + sigmas[0] ** 2 * score_fn(x, _batch_time(sde.level_time(0), data.shape))
    return impose(x, known)


def ald_inpaint(rng, sde, score_fn, data, mask, transform=None, step_lr=2e-5, n_steps_each=100, denoise=True,
                init="prior"):
    """NCSN's inpainting by annealed Langevin dynamics (Song & Ermon 2019, the appendix's inpainting algorithm;
    SPEC §6-7).

    `ald_sample`'s levels, steps α_i = step_lr σ_i²/σ_L² and init, run on the whole x; at each level i a noisy copy
    ỹ = y + σ_i z of the known latent coordinates y (mask and transform as for `inpaint`) is drawn once and imposed
    before the level and after every Langevin step, so the score always sees the known part at the level's own
    noise. After the optional denoising step x ← x + σ_L² s(x, σ_L) the known part is set exactly.
    Returns (x [data.shape], nfe = N n_steps_each + denoise), nfe as for `ald_sample`.
    """
    data = jnp.asarray(data, jnp.float32)
    transform = np.eye(data.shape[-1], dtype=np.float32) if transform is None else np.asarray(transform, np.float32)
    mask = np.asarray(mask)
    _check_inpainting_inputs(data, mask, transform)
    if int(n_steps_each) < 1:
        raise ValueError(f"n_steps_each (Langevin steps per noise level) must be >= 1, got {n_steps_each}")
    x = _ald_inpaint(rng, as_pytree(score_fn), data, jnp.asarray(mask, bool), jnp.asarray(transform),
                     jnp.float32(step_lr), sde=sde, n_steps_each=int(n_steps_each), denoise=bool(denoise), init=init)
    return x, sde.N * int(n_steps_each) + int(bool(denoise))


# How each sampling method inpaints, with its options from config.sampling: NCSN's "ald" by `ald_inpaint`; every
# other method by the PC loop of `inpaint` with config.sampling's predictor, corrector and snr.
_PC_INPAINTING = (inpaint, lambda s: dict(predictor=s.predictor, corrector=s.corrector, snr=s.snr,
                                          n_steps=s.n_steps_each, denoise=s.noise_removal, eps=s.eps))
_INPAINTING = {"ald": (ald_inpaint, _CONFIG_OPTIONS["ald"])}


def get_inpainting_fn(config, sde):
    """fn(rng, score_fn, data, mask, transform=None) -> (x, nfe): `ald_inpaint` for config.sampling.method "ald",
    else `inpaint` (PC) with config.sampling's predictor, corrector, snr, n_steps_each, noise_removal and eps."""
    inpainter, options = _INPAINTING.get(config.sampling.method, _PC_INPAINTING)
    options = options(config.sampling)
    return lambda rng, score_fn, data, mask, transform=None: inpainter(rng, sde, score_fn, data, mask,
                                                                       transform=transform, **options)


def grey_projection(x, transform=COLOR_DECORRELATION):
    """x with all but its first latent coordinate (x M)[..., 0] set to 0: for RGB, the grey image R = G = B = mean."""
    transform = jnp.asarray(transform, jnp.float32)
    z = _to_latent(jnp.asarray(x, jnp.float32), transform)
    return _from_latent(z.at[..., 1:].set(0.0), transform)


def colorize(rng, sde, score_fn, grey, transform=COLOR_DECORRELATION, **options):
    """Colorization (score-SDE paper, Appendix I): `inpaint` with the first latent coordinate of grey M known.

    grey [..., C]: e.g. `grey_projection(images)`, the grey image in all C = 3 channels; only its first latent
    coordinate is used. transform: the paper's COLOR_DECORRELATION, or any orthogonal C×C matrix whose first column
    spans the observed direction. options: those of `inpaint`. Returns (x, nfe).
    """
    channels = np.shape(grey)[-1]
    mask = np.arange(channels) == 0
    return inpaint(rng, sde, score_fn, grey, mask, transform=transform, **options)


def _conditional_score(score_fn, classifier_grad_fn, y, scale, x, t):
    return score_fn(x, t) + scale * classifier_grad_fn(x, t, y)


def conditional_score_fn(score_fn, classifier_grad_fn, y, scale=1.0):
    """The score of p_t(x | y): s(x, t) + scale ∇x log p_t(y | x) (Bayes; score-SDE paper, Appendix I).

    classifier_grad_fn(x, t, y) -> ∇x log p_t(y | x) [B, ...], from a time-dependent classifier (see
    `classifier_grad_fn`); y [B] the wanted labels, one per example of the batch to be sampled. scale = 1 is exact
    conditioning; scale > 1 sharpens it (classifier guidance). The result is a score function for any sampler.
    """
    return jax.tree_util.Partial(_conditional_score, as_pytree(score_fn), as_pytree(classifier_grad_fn),
                                 jnp.asarray(y), jnp.float32(scale))


def _classifier_grad(log_prob_fn, x, t, y):
    return jax.grad(lambda x: jnp.sum(log_prob_fn(x, t, y)))(x)


def classifier_grad_fn(log_prob_fn):
    """(x, t, y) -> ∇x log p_t(y | x) by autodiff of a classifier's log_prob_fn(x, t, y) -> log p_t(y | x) [B]."""
    return jax.tree_util.Partial(_classifier_grad, as_pytree(log_prob_fn))
