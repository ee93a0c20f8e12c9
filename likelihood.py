"""Likelihoods: the probability-flow ODE log-likelihood (SPEC §4), bits/dim with uniform dequantization (SPEC §4)
and seed 001's likelihood-weighting bound on the SDE model's NLL (SPEC §3).

Every function takes a plain score function `score_fn(x [B, ...], t [B]) -> [B, ...]` and an SDE of sde_lib, so
an exact Gaussian-mixture score (datasets.GaussianMixture.score_fn) checks each path against closed forms.
All quantities are per example [B] and in nats unless the name says bits.
"""
import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import sde_lib

# Adaptive explicit Runge-Kutta solvers by name (SPEC §4). All are FSAL, which `_count_nfe` relies on.
_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8, "bosh3": diffrax.Bosh3}

# Hutchinson-Skilling probes v with E[v vᵀ] = I (SPEC §4).
_PROBES = {
    "rademacher": lambda rng, shape, dtype: jax.random.rademacher(rng, shape, dtype),
    "gaussian": lambda rng, shape, dtype: jax.random.normal(rng, shape, dtype),
}


def _lookup(registry, name, what):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


# --- Divergences of a batched function fn: [B, ...] -> [B, ...] whose examples do not interact. ---
def divergence_exact(fn, x):
    """(fn(x), ∇·fn(x) [B]): the trace of each example's Jacobian from D forward-mode products (small D only).

    One linearization, then a jvp per basis vector e_i (vmapped over the basis), applied to every example at once.
    """
    d = int(np.prod(x.shape[1:]))
    fx, jvp = jax.linearize(fn, x)
    basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
    columns = jax.vmap(lambda e: jvp(jnp.broadcast_to(e, x.shape)))(basis)  # [D, B, ...]: J e_i per example
    return fx, jnp.einsum("ibi->b", columns.reshape(d, x.shape[0], d))


def divergence_hutchinson(fn, x, probe):
    """(fn(x), vᵀ (∂fn/∂x) v [B]): the Hutchinson-Skilling estimate of ∇·fn with probe v = `probe` (SPEC §4)."""
    fx, jv = jax.jvp(fn, (x,), (probe,))
    return fx, jnp.sum((probe * jv).reshape(x.shape[0], -1), axis=1)


# --- Probability-flow ODE likelihood (SPEC §4). ---
def _count_nfe(solver, num_steps):
    """Evaluations of the ODE's vector field in one diffrax solve with a PIDController and dt0=None.

    Read from diffrax 0.7's code and checked by counting calls (tests/test_likelihood.py): diffeqsolve wraps the
    term, so the PIDController skips its initial-step rule (no evaluations) and starts with dt0 = 0.01; the first
    step evaluates all S stages of the tableau (S = 7 for Tsit5 / Dopri5); every later attempted step, accepted
    or rejected, takes its first stage from the previous step's last one (FSAL) and evaluates S - 1. So
    nfe = 1 + (S - 1) num_steps, num_steps = accepted + rejected steps. Not counted: each rejection of the very
    first step costs one more evaluation (it has no previous step to take its first stage from).
    """
    return 1 + (solver.tableau.num_stages - 1) * num_steps


def _ode_vector_field(sde, score_fn, exact):
    """(t, (x, ·), probe) -> (f̃(x, t), ∇·f̃(x, t)) for the probability-flow ODE f̃ = f - ½ g² s (SPEC §2)."""
    drift_fn = lambda x, t: sde.reverse(score_fn, probability_flow=True).sde(x, t)[0]

    def vector_field(t, state, probe):
        x, _ = state
        fn = functools.partial(drift_fn, t=jnp.full(x.shape[:1], t, x.dtype))
        return divergence_exact(fn, x) if exact else divergence_hutchinson(fn, x, probe)

    return vector_field


@functools.partial(jax.jit, static_argnames=("sde", "exact_divergence", "hutchinson_type", "rtol",
                                             "atol", "eps", "solver", "prior_logp", "max_steps"))
def _log_likelihood(rng, x, score_fn, *, sde, exact_divergence, hutchinson_type, rtol, atol, eps, solver,
                    prior_logp, max_steps):
    probe = _PROBES[hutchinson_type](rng, x.shape, x.dtype)  # one v per example, fixed for the whole solve
    solver = _SOLVERS[solver]()
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(_ode_vector_field(sde, score_fn, exact_divergence)), solver, t0=eps, t1=sde.T, dt0=None,
        y0=(x, jnp.zeros(x.shape[:1], x.dtype)), args=probe,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps)
    z, integral = solution.ys[0][-1], solution.ys[1][-1]
    prior_logp = sde.prior_logp if prior_logp is None else prior_logp
    return prior_logp(z) + integral, z, _count_nfe(solver, solution.stats["num_steps"])


def log_likelihood(rng, sde, score_fn, x, exact_divergence=False, hutchinson_type="rademacher", rtol=1e-5,
                   atol=1e-5, eps=1e-5, solver="tsit5", prior_logp=None, max_steps=16384):
    """log p_eps(x) [B] in nats from the probability-flow ODE (SPEC §4), with z = x_T [B, ...] and the NFE.

    Integrates dx/dt = f̃ = f - ½ g² s jointly with ∫ ∇·f̃ dt from eps to T, the whole batch as one state of one
    compiled diffrax solve (adaptive step with a PIDController, so the step size is shared by the batch), and
    returns log p_eps(x) = prior_logp(x_T) + ∫_eps^T ∇·f̃(x_t, t) dt. It is the density at time eps of the model
    whose time-T marginal is `prior_logp` (default sde.prior_logp; pass the exact log p_T to remove the prior
    mismatch in tests). The divergence is exact (`exact_divergence`: D jvps per evaluation, small D only) or the
    Hutchinson-Skilling estimate with one `hutchinson_type` probe per example drawn from `rng`, unbiased for the
    integral. nfe (an int32 scalar) counts evaluations of f̃ as documented in `_count_nfe`; each costs one jvp
    of the score (Hutchinson) or one linearization and D jvps (exact).

    Compiled once per (sde, options, score function structure): the score function is a traced argument
    (sde_lib.as_pytree), so a network's new parameters reuse the compiled solve. If the solve
    needs more than max_steps steps, diffrax raises an error at run time.
    """
    sde_lib.check_eps(eps, sde.T)
    _lookup(_SOLVERS, solver, "ODE solver")
    _lookup(_PROBES, hutchinson_type, "Hutchinson probe type")
    return _log_likelihood(rng, x, sde_lib.as_pytree(score_fn), sde=sde, exact_divergence=exact_divergence,
                           hutchinson_type=hutchinson_type, rtol=float(rtol), atol=float(atol), eps=float(eps),
                           solver=solver, prior_logp=prior_logp, max_steps=int(max_steps))


def get_likelihood_fn(sde, score_fn, **options):
    """fn(rng, x) -> (logp, z, nfe): `log_likelihood` with the SDE, score function and options bound."""
    return lambda rng, x: log_likelihood(rng, sde, score_fn, x, **options)


# --- Bits per dimension and dequantization (SPEC §4). ---
def _check_data_range(data_range, levels):
    low, high = data_range
    if not high > low:
        raise ValueError(f"data_range must be (low, high) with high > low, got {data_range}")
    if int(levels) < 2:
        raise ValueError(f"levels (the number of discrete values per dimension) must be >= 2, got {levels}")
    return high - low, low


def uniform_dequantize(rng, k, data_range=(-1.0, 1.0), levels=256):
    """x = a (k + u) / K + b with u ~ U[0, 1)^D (SPEC §4): integer data k ∈ {0..K-1} mapped into data_range."""
    a, b = _check_data_range(data_range, levels)
    u = jax.random.uniform(rng, jnp.shape(k))
    return a * (jnp.asarray(k, jnp.float32) + u) / levels + b


def bits_per_dim(logp, data_shape, data_range=(-1.0, 1.0), levels=256):
    """bpd [B] = (-log p(x) - D log|a/K|) / (D ln 2) for x = a (k + u)/K + b (SPEC §4).

    logp is the model's log-density of the dequantized x in model space (nats); the offset -log|a/K| / ln 2 per
    dimension converts it to the discrete data's bits (+8 for a = 1, K = 256; +7 for a = 2).
    """
    a, _ = _check_data_range(data_range, levels)
    d = int(np.prod(data_shape))
    return (-jnp.asarray(logp) - d * np.log(a / levels)) / (d * np.log(2.0))


# --- Seed 001's bound on the SDE model's NLL (SPEC §3). ---
def _dsm_integrand(sde, score_fn, x_t, z, t):
    """½ [g² ||s - ∇log p0t||² - g² ||∇log p0t||² - 2 ∇·f] with ∇log p0t = -z/σ_t and ∇·f = D a(t) (SPEC §3).

    Written as ½ [(g²/σ²)(||σ s + z||² - ||z||²) - 2 D a]: the same number, without forming the two O(D/σ²) terms
    that cancel near t = 0.
    """
    d = z[0].size
    std = sde.marginal_std(t)
    scaled = sde_lib.batch_mul(std, score_fn(x_t, t)) + z
    sq = lambda y: jnp.sum(y.reshape(y.shape[0], -1) ** 2, axis=1)
    return 0.5 * (sde.diffusion_sq(t) / std**2 * (sq(scaled) - sq(z)) - 2.0 * d * sde.drift_coef(t))


def _implicit_integrand(sde, score_fn, x_t, z, t):
    """½ [g² ||s||² + 2 g² ∇·s - 2 ∇·f] with the exact ∇·s (SPEC §3, implicit form; small D only)."""
    d = z[0].size
    s, div = divergence_exact(lambda y: score_fn(y, t), x_t)
    sq = jnp.sum(s.reshape(s.shape[0], -1) ** 2, axis=1)
    return 0.5 * (sde.diffusion_sq(t) * (sq + 2.0 * div) - 2.0 * d * sde.drift_coef(t))


_BOUND_FORMS = {"dsm": _dsm_integrand, "implicit": _implicit_integrand}


def _bound_samples(rng, x, sde, score_fn, importance_sampling, eps, form, prior_logp):
    """One Monte-Carlo sample per example [B] of -log π(x_T) + w(t) h(t), t uniform (w = T - eps) or ~ q (w = 1/q)."""
    t_rng, z_rng, prior_rng = jax.random.split(rng, 3)
    t = sde.sample_time(t_rng, x.shape[0], eps, importance=importance_sampling)
    weight = 1.0 / sde.importance_density(t, eps) if importance_sampling else sde.T - eps
    z = jax.random.normal(z_rng, x.shape, x.dtype)
    mean, std = sde.marginal_prob(x, t)
    integrand = _BOUND_FORMS[form](sde, score_fn, mean + sde_lib.batch_mul(std, z), z, t)
    mean_T, std_T = sde.marginal_prob(x, jnp.full(x.shape[:1], sde.T, x.dtype))
    x_T = mean_T + sde_lib.batch_mul(std_T, jax.random.normal(prior_rng, x.shape, x.dtype))
    return -prior_logp(x_T) + weight * integrand


@functools.partial(jax.jit, static_argnames=("sde", "n_t", "t_chunk", "importance_sampling", "eps",
                                             "form", "prior_logp"))
def _likelihood_bound(rng, x, score_fn, *, sde, n_t, t_chunk, importance_sampling, eps, form, prior_logp):
    prior_logp = sde.prior_logp if prior_logp is None else prior_logp
    sample = functools.partial(_bound_samples, sde=sde, score_fn=score_fn, importance_sampling=importance_sampling,
                               eps=eps, form=form, prior_logp=prior_logp)
    tiled = jnp.broadcast_to(x, (t_chunk,) + x.shape).reshape((t_chunk * x.shape[0],) + x.shape[1:])
    chunks = jax.random.split(rng, n_t // t_chunk)
    samples = jax.lax.map(lambda key: sample(key, tiled).reshape(t_chunk, x.shape[0]), chunks)
    samples = samples.reshape(n_t, x.shape[0])
    return samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(n_t)


def _largest_divisor_at_most(n, cap):
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def likelihood_bound(rng, sde, score_fn, x, n_t=1000, importance_sampling=True, eps=1e-5, form="dsm",
                     prior_logp=None, t_chunk=100):
    """Seed 001's upper bound (Theorem 2) on the SDE model's NLL in nats, with its Monte-Carlo standard error.

    Returns (bound [B], stderr [B]) (ARCHITECTURE's `nll_bound` is the first element) for
      bound(x0) = -E[log π(x_T)] + ∫_eps^T E[h(x_t, t)] dt,   x_t = m(t) x0 + σ_t z,   z ~ N(0, I),
    with h the DSM integrand ½[g²||s - ∇log p0t||² - g²||∇log p0t||² - 2∇·f] (form="dsm", no divergence) or its
    integration-by-parts twin ½[g²||s||² + 2g²∇·s - 2∇·f] (form="implicit", exact ∇·s, small D only) (SPEC §3).
    Each of the n_t samples per example draws its own t (uniform on [eps, T], weight T - eps, or from
    q(t) ∝ g²/σ² with weight 1/q(t) when importance_sampling), its own z, and its own x_T ~ p0T(·|x0) for the
    prior term; bound is their mean and stderr their standard deviation / sqrt(n_t).

    What it bounds: the time-eps marginal p_eps^SDE of the model (the reverse SDE with score s started from π at
    T) at the noised point x_eps = m(eps) x0 + σ_eps z, averaged: bound(x0) ≥ E_{x_eps|x0}[-log p_eps^SDE(x_eps)].
    The forward path from x0, restricted to [eps, T], is the mixture over x_eps of forward paths started at x_eps,
    and the bound of each of those (the implicit form's variational argument) is tight when s is the true score
    and π = p_T; so then equality holds for every x0 (tests/test_likelihood.py checks this at eps = 0.5, where it
    differs from -log p_eps(x0)). As eps → 0 the right side tends to -log p_0^SDE(x0) for VP and sub-VP; for VE
    (σ_0 = σ_min in sde_lib's convention) to its average over x0 + σ_min z.
    `prior_logp` replaces log π (default sde.prior_logp). The samples are evaluated t_chunk times at a time
    (the largest divisor of n_t not above t_chunk) to bound memory: a score batch is t_chunk · B.
    """
    sde_lib.check_eps(eps, sde.T)
    _lookup(_BOUND_FORMS, form, "bound form")
    if int(n_t) < 2:
        raise ValueError(f"n_t must be >= 2 to estimate the Monte-Carlo error, got {n_t}")
    return _likelihood_bound(rng, x, sde_lib.as_pytree(score_fn), sde=sde, n_t=int(n_t),
                             t_chunk=_largest_divisor_at_most(int(n_t), int(t_chunk)),
                             importance_sampling=bool(importance_sampling), eps=float(eps), form=form,
                             prior_logp=prior_logp)
