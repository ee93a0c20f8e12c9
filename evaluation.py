"""Score-model metrics and evaluators (SPEC §5, §8).

The metrics are pure functions of a score function `score_fn(x, t)` (x [B, ...], t [B]) and return one value
per example [B]: the score Fokker-Planck residual (SPEC §5) and the conservativity of the Jacobian (SPEC §5).
Evaluators wrap them for a training run: `run(rng, score_fn, data)` takes an iterable of data batches x_0
[B, ...] (a list of arrays will do) and yields (name, value) pairs that the loop logs as they are.
"""
import jax
import jax.numpy as jnp
import numpy as np

from sde_lib import batch_mul, check_eps

# --- Probes (Hutchinson, conservativity). ---

_PROBES = {
    "rademacher": lambda rng, shape: jax.random.rademacher(rng, shape, jnp.float32),
    "gaussian": lambda rng, shape: jax.random.normal(rng, shape, jnp.float32),
}


def sample_probe(rng, shape, probe_type):
    """Zero-mean, unit-covariance probes of shape `shape`: "rademacher" (±1) or "gaussian"."""
    if probe_type not in _PROBES:
        raise ValueError(f"unknown probe type {probe_type!r}; choose one of {sorted(_PROBES)}")
    return _PROBES[probe_type](rng, shape)


def _single(score_fn):
    """The score of one example: (x [...], t []) -> [...]."""
    return lambda x, t: score_fn(x[None], t[None])[0]


def _exact_divergence(fn, x):
    """tr(∂fn/∂x) from the full Jacobian (D forward passes: small D only)."""
    jac = jax.jacfwd(fn)(x).reshape(x.size, x.size)
    return jnp.trace(jac)


def _hutchinson_divergence(fn, x, v):
    """vᵀ (∂fn/∂x) v, an unbiased estimate of tr(∂fn/∂x) for E[v vᵀ] = I (one forward-mode product)."""
    return jnp.sum(v * jax.jvp(fn, (x,), (v,))[1])


# --- Score Fokker-Planck residual (SPEC §5). ---

def _fpe_residual_single(sde, s, x, t, v):
    """r(x, t) = ∂_t s - ∇_x[½ g² (∇·s + ||s||²) - ⟨f, s⟩] for one example, f = a(t) x (∇·f is constant in x)."""
    ds_dt = jax.jvp(lambda tt: s(x, tt), (t,), (jnp.ones_like(t),))[1]

    def potential(y):
        score_at = lambda z: s(z, t)
        div = _exact_divergence(score_at, y) if v is None else _hutchinson_divergence(score_at, y, v)
        sy = score_at(y)
        return 0.5 * sde.diffusion_sq(t) * (div + jnp.sum(sy**2)) - sde.drift_coef(t) * jnp.sum(y * sy)

    return ds_dt - jax.grad(potential)(x)


def fpe_residual_vector(rng, sde, score_fn, x, t, exact_divergence=False, hutchinson_type="rademacher", probe=None):
    """The score-FPE residual r(x, t) [B, ...] of SPEC §5, per example (vmap: no mixing across the batch).

    ∂_t s is a forward-mode derivative in t (jax.jvp), ∇·s the exact Jacobian trace or Hutchinson's vᵀ J v with
    one fixed probe v per example (`probe` [B, ...], else drawn from rng), and the outer ∇_x reverse mode. With
    Hutchinson, r̂ is unbiased over v (∇_x is linear) but its square is not: E_v||r̂||² = ||r||² +
    ¼ g⁴ E_v||∇_x(vᵀJv - tr J)||². The excess vanishes where J is constant in x, and for Rademacher probes also
    where J's x-dependent part is diagonal; otherwise it is positive even for the exact score. Use the exact
    divergence for the metric when D allows.
    """
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    s = _single(score_fn)
    if exact_divergence:
        return jax.vmap(lambda xi, ti: _fpe_residual_single(sde, s, xi, ti, None))(x, t)
    v = sample_probe(rng, x.shape, hutchinson_type) if probe is None else probe
    return jax.vmap(lambda xi, ti, vi: _fpe_residual_single(sde, s, xi, ti, vi))(x, t, v)


def fpe_residual(rng, sde, score_fn, x, t, exact_divergence=False, hutchinson_type="rademacher"):
    """Mean squared score-FPE residual per dimension ||r(x, t)||² / D [B] (SPEC §5); 0 for the exact score."""
    r = fpe_residual_vector(rng, sde, score_fn, x, t, exact_divergence, hutchinson_type)
    return jnp.mean(r.reshape(r.shape[0], -1) ** 2, axis=1)


# --- Conservativity (SPEC §5). ---

def _conservativity_exact_single(s, x, t):
    jac = jax.jacfwd(lambda y: s(y, t))(x).reshape(x.size, x.size)
    return jnp.sum((jac - jac.T) ** 2) / jnp.sum(jac**2)


def _conservativity_probes_single(s, x, t, u):
    """Σ_p ||(J - Jᵀ) u_p||² / Σ_p ||J u_p||² over probes u [P, ...]: J u by jvp, Jᵀ u by vjp."""
    f = lambda y: s(y, t)
    _, jvp_fn = jax.linearize(f, x)
    _, vjp_fn = jax.vjp(f, x)
    ju = jax.vmap(jvp_fn)(u)
    jtu = jax.vmap(lambda ui: vjp_fn(ui)[0])(u)
    return jnp.sum((ju - jtu) ** 2) / jnp.sum(ju**2)


def conservativity(rng, score_fn, x, t, n_probes=16, exact=False, probe_type="rademacher"):
    """||J - Jᵀ||²_F / ||J||²_F [B] of J = ∂s/∂x at (x, t), per example (SPEC §5); 0 for a gradient field.

    exact: from the full Jacobian (small D). Otherwise a ratio of probe averages: the SPEC's probe
    (vᵀJu - uᵀJv)² = (vᵀ(J - Jᵀ)u)² averaged over v analytically gives ||(J - Jᵀ)u||², whose mean over
    u is ||J - Jᵀ||²_F (and ||Ju||² that of ||J||²_F); the ratio of the two means over n_probes probes u is
    consistent (biased at O(1/n_probes)).
    """
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    s = _single(score_fn)
    if exact:
        return jax.vmap(lambda xi, ti: _conservativity_exact_single(s, xi, ti))(x, t)
    u = sample_probe(rng, (x.shape[0], n_probes) + x.shape[1:], probe_type)
    return jax.vmap(lambda xi, ti, ui: _conservativity_probes_single(s, xi, ti, ui))(x, t, u)


# --- Evaluators: run(rng, score_fn, data) yields (name, value). ---

def _perturb(rng, sde, x0, t):
    """x_t = m(t) x_0 + σ_t z ~ p_0t(· | x_0)."""
    mean, std = sde.marginal_prob(x0, t)
    return mean + batch_mul(std, jax.random.normal(rng, x0.shape, x0.dtype))


def _binned_times(rng, batch_size, n_bins, eps, T):
    """Stratified t on [eps, T]: example b lies in bin b mod n_bins, uniformly within it. Returns (t, bin)."""
    bins = jnp.arange(batch_size) % n_bins
    u = jax.random.uniform(rng, (batch_size,))
    return eps + (bins + u) * (T - eps) / n_bins, bins


def nll_evaluator(sde, config, prior_logp=None):
    """Test NLL by the probability-flow ODE (SPEC §4): yields "nll_nats_per_dim" (mean of -log p(x)/D over all
    examples), its standard error "nll_nats_per_dim_se", and the mean number of score evaluations "nfe".
    prior_logp replaces sde.prior_logp (e.g. the exact log p_T of a Gaussian mixture)."""
    e = config.eval

    def run(rng, score_fn, data):
        import likelihood  # lazily: evaluation.py is usable without the ODE solver's dependencies

        nll, nfe = [], []
        for x in data:
            rng, step_rng = jax.random.split(rng)
            logp, _, n = likelihood.log_likelihood(
                step_rng, sde, score_fn, x, exact_divergence=e.exact_divergence,
                hutchinson_type=e.get("hutchinson_type", "rademacher"), rtol=e.rtol, atol=e.atol, eps=e.eps,
                solver=e.get("solver", "tsit5"), prior_logp=prior_logp)
            nll.append(-np.asarray(logp, np.float64) / np.prod(x.shape[1:]))
            nfe.append(float(np.mean(n)))
        nll = np.concatenate(nll)
        yield "nll_nats_per_dim", float(nll.mean())
        yield "nll_nats_per_dim_se", float(nll.std(ddof=1) / np.sqrt(nll.size)) if nll.size > 1 else float("nan")
        yield "nfe", float(np.mean(nfe))

    return run


def fpe_evaluator(sde, config):
    """Mean squared FPE residual E||r||²/D at x_t ~ p_t, t stratified over config.eval.fpe_t_bins bins of
    [eps, T]: yields "fpe_residual" (all t) and "fpe_residual_t{k}" for bin k (bin 0 nearest eps)."""
    e = config.eval
    n_bins, eps = e.get("fpe_t_bins", 10), e.eps
    check_eps(eps, sde.T)

    def run(rng, score_fn, data):
        fn = jax.jit(lambda r, x, t: fpe_residual(r, sde, score_fn, x, t, e.exact_divergence,
                                                  e.get("hutchinson_type", "rademacher")))
        sums, counts = np.zeros(n_bins), np.zeros(n_bins)
        for x0 in data:
            rng, t_rng, z_rng, r_rng = jax.random.split(rng, 4)
            t, bins = _binned_times(t_rng, x0.shape[0], n_bins, eps, sde.T)
            res = np.asarray(fn(r_rng, _perturb(z_rng, sde, x0, t), t), np.float64)
            sums += np.bincount(np.asarray(bins), weights=res, minlength=n_bins)
            counts += np.bincount(np.asarray(bins), minlength=n_bins)
        yield "fpe_residual", float(sums.sum() / counts.sum())
        for k in range(n_bins):
            yield f"fpe_residual_t{k}", float(sums[k] / counts[k]) if counts[k] else float("nan")

    return run


def conservativity_evaluator(sde, config):
    """Mean of ||J - Jᵀ||²_F / ||J||²_F at x_t ~ p_t, t ~ U[eps, T]: yields "conservativity".
    Exact Jacobians when config.eval.exact_divergence (small D), else config.eval.conservativity_probes probes."""
    e = config.eval
    check_eps(e.eps, sde.T)

    def run(rng, score_fn, data):
        fn = jax.jit(lambda r, x, t: conservativity(r, score_fn, x, t, n_probes=e.get("conservativity_probes", 16),
                                                    exact=e.exact_divergence))
        total, count = 0.0, 0
        for x0 in data:
            rng, t_rng, z_rng, r_rng = jax.random.split(rng, 4)
            t = sde.sample_time(t_rng, x0.shape[0], e.eps)
            total += float(jnp.sum(fn(r_rng, _perturb(z_rng, sde, x0, t), t)))
            count += x0.shape[0]
        yield "conservativity", total / count

    return run


# name -> (the config.eval flag that enables it, its default, builder(sde, config)).
EVALUATORS = {
    "nll": ("enable_bpd", True, nll_evaluator),
    "fpe": ("enable_fpe", False, fpe_evaluator),
    "conservativity": ("enable_conservativity", False, conservativity_evaluator),
}


def get_evaluators(config, sde):
    """The evaluators enabled in config.eval (enable_bpd, enable_fpe, enable_conservativity), as run functions."""
    return [build(sde, config) for flag, default, build in EVALUATORS.values() if config.eval.get(flag, default)]
