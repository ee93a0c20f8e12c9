"""SDE schedules against closed forms and simulation (SPEC §1, §2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import sde_lib

SDES = {
    "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=1000),
    "vp": lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000),
    "subvp": lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=1000),
}


@pytest.mark.parametrize("name", SDES)
def test_schedules_solve_the_moment_equations(name):
    """For dx = a x dt + g dw: dm/dt = a m and dσ²/dt = 2 a σ² + g² (exact identities).

    Tolerance: near t = 1 the VP right-hand side cancels terms of size g² ≈ 20 in float32 (ulp ≈ 2e-6).
    """
    sde = SDES[name]()
    t = jnp.linspace(0.05, 1.0, 20)
    dm = jax.vmap(jax.grad(lambda s: sde.mean_coef(s)))(t)
    dvar = jax.vmap(jax.grad(lambda s: sde.marginal_std(s) ** 2))(t)
    a, g2, m, var = sde.drift_coef(t), sde.diffusion_sq(t), sde.mean_coef(t), sde.marginal_std(t) ** 2
    np.testing.assert_allclose(dm, a * m, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dvar, 2 * a * var + g2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SDES)
def test_marginal_prob_matches_euler_maruyama_simulation(name):
    """Simulate the forward SDE from s to t starting at the exact marginal at s; compare mean/var at t."""
    sde, n, steps, s, t = SDES[name](), 40_000, 1000, 0.1, 0.7
    x0 = 1.5
    rng_start, rng_path = jax.random.split(jax.random.PRNGKey(0))
    mean_s, std_s = sde.marginal_prob(jnp.full((n, 1), x0), jnp.full((n,), s))
    x = mean_s + std_s[:, None] * jax.random.normal(rng_start, (n, 1))
    dt = (t - s) / steps

    def step(x, inp):
        tau, key = inp
        drift, diffusion = sde.sde(x, jnp.full((n,), tau))
        return x + drift * dt + diffusion[:, None] * np.sqrt(dt) * jax.random.normal(key, x.shape), None

    taus = s + dt * jnp.arange(steps)
    x, _ = jax.lax.scan(step, x, (taus, jax.random.split(rng_path, steps)))
    mean_t, std_t = sde.marginal_prob(jnp.full((1, 1), x0), jnp.full((1,), t))
    var_t = float(std_t[0]) ** 2
    # 4 Monte-Carlo standard errors; the Euler-Maruyama bias (O(dt) = 6e-4 relative) is well below that.
    assert abs(float(x.mean()) - float(mean_t[0, 0])) < 4 * np.sqrt(var_t / n)
    assert abs(float(x.var()) - var_t) < 4 * var_t * np.sqrt(2.0 / n)


@pytest.mark.parametrize("name", SDES)
def test_prior_logp_matches_scipy(name):
    sde = SDES[name]()
    z = np.asarray(sde.prior_sampling(jax.random.PRNGKey(1), (5, 3, 4)))
    expected = scipy.stats.norm(scale=sde.prior_std).logpdf(z.astype(np.float64)).reshape(5, -1).sum(1)
    np.testing.assert_allclose(sde.prior_logp(jnp.asarray(z)), expected, rtol=1e-5)


@pytest.mark.parametrize("name", SDES)
def test_prior_sampling_has_prior_std(name):
    sde = SDES[name]()
    z = sde.prior_sampling(jax.random.PRNGKey(2), (100_000,))
    # s.e. of the sample std is std/sqrt(2n) = 0.22%; allow 4 s.e.
    assert abs(float(z.std()) / sde.prior_std - 1) < 4 / np.sqrt(2 * 100_000)


@pytest.mark.parametrize("name", SDES)
def test_reverse_sde_and_probability_flow_drifts(name):
    """Reverse drift f - g² s; probability flow f - ½ g² s with zero diffusion (SPEC §2)."""
    sde = SDES[name]()
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 3))
    t = jnp.array([0.1, 0.3, 0.6, 0.9])
    score_fn = lambda x, t: jnp.sin(x) * t[:, None]
    f, g = sde.sde(x, t)
    rev_f, rev_g = sde.reverse(score_fn).sde(x, t)
    pf_f, pf_g = sde.reverse(score_fn, probability_flow=True).sde(x, t)
    np.testing.assert_allclose(rev_f, f - g[:, None] ** 2 * score_fn(x, t), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pf_f, f - 0.5 * g[:, None] ** 2 * score_fn(x, t), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rev_g, g)
    np.testing.assert_array_equal(pf_g, 0.0)


def test_vp_discretization_is_ddpm():
    """β_i = β_min/N + i/(N-1) (β_max - β_min)/N; the discrete marginal is ᾱ_i = Π(1 - β_j) (SPEC §1)."""
    n = 1000
    sde = sde_lib.VPSDE(0.1, 20.0, n)
    i = np.arange(n)
    betas = 0.1 / n + i / (n - 1) * (20.0 - 0.1) / n
    np.testing.assert_allclose(sde.discrete_betas, betas, rtol=1e-12)
    mean, std = sde.discrete_marginal(jnp.ones((3, 2)), jnp.array([0, 10, 999]))
    abar = np.cumprod(1 - betas)[[0, 10, 999]]
    np.testing.assert_allclose(mean[:, 0], np.sqrt(abar), rtol=1e-6)
    np.testing.assert_allclose(std, np.sqrt(1 - abar), rtol=1e-5)
    # Σ β_i = B(1) exactly, so log ᾱ_N = -B(1) - ½ Σ β_i² + O(Σ β_i³): the discrete chain is the continuous one
    # up to second order in the step.
    assert np.log(abar[-1]) == pytest.approx(-(0.1 + 0.5 * 19.9) - 0.5 * np.sum(betas**2), abs=np.sum(betas**3))
    f, g = sde.discretize(jnp.ones((1, 2)), jnp.array([1.0]))
    np.testing.assert_allclose(f, np.sqrt(1 - betas[-1]) - 1, rtol=1e-5)
    np.testing.assert_allclose(g, np.sqrt(betas[-1]), rtol=1e-6)


def test_ve_discretization_is_smld():
    sde = sde_lib.VESDE(0.01, 50.0, N=10)
    sigmas = np.geomspace(0.01, 50.0, 10)
    np.testing.assert_allclose(sde.discrete_sigmas, sigmas, rtol=1e-10)
    t = sde.level_time(jnp.array([0, 4, 9]))
    f, g = sde.discretize(jnp.ones((3, 2)), t)
    np.testing.assert_array_equal(f, 0.0)
    np.testing.assert_allclose(g, np.sqrt(sigmas[[0, 4, 9]] ** 2 - np.r_[0, sigmas[[3, 8]]] ** 2), rtol=1e-5)
    # The network is told the NCSN level index: 0 is the largest σ.
    np.testing.assert_array_equal(sde.noise_labels(t, continuous=False), [9, 5, 0])


def test_ancestral_steps():
    vp = sde_lib.VPSDE(0.1, 20.0, N=100)
    x, s = jnp.ones((1, 2)), jnp.full((1, 2), 0.5)
    mean, std = vp.ancestral_step(x, jnp.array([1.0]), s)
    beta = vp.discrete_betas[-1]
    np.testing.assert_allclose(mean, (1 + beta * 0.5) / np.sqrt(1 - beta), rtol=1e-6)
    np.testing.assert_allclose(std, np.sqrt(beta), rtol=1e-6)
    ve = sde_lib.VESDE(0.01, 50.0, N=10)
    mean, std = ve.ancestral_step(x, ve.level_time(jnp.array([5])), s)
    sig, adj = ve.discrete_sigmas[5], ve.discrete_sigmas[4]
    np.testing.assert_allclose(mean, 1 + (sig**2 - adj**2) * 0.5, rtol=1e-5)
    np.testing.assert_allclose(std, np.sqrt(adj**2 * (sig**2 - adj**2) / sig**2), rtol=1e-5)


@pytest.mark.parametrize("name", SDES)
def test_importance_icdf_inverts_cum_weight(name):
    """CDF(icdf(u)) = u, with the CDF from the closed-form antiderivative (SPEC §3)."""
    sde, eps = SDES[name](), 1e-5
    u = jnp.linspace(0.0, 1.0, 11)
    t = sde.importance_icdf(u, eps)
    cdf = sde.likelihood_importance_cum_weight(t, eps) / sde.likelihood_importance_cum_weight(sde.T, eps)
    np.testing.assert_allclose(cdf, u, atol=2e-5)
    assert float(t[0]) == pytest.approx(eps, rel=1e-3) and float(t[-1]) == pytest.approx(1.0, rel=1e-6)


def test_vp_importance_normalizer_closed_form():
    """Z = ∫_eps^1 β/(1 - e^{-B}) dt = log(e^{B(1)} - 1) - log(e^{B(eps)} - 1), checked against quadrature."""
    import scipy.integrate

    sde, eps = sde_lib.VPSDE(), 1e-3
    integrand = lambda s: float(sde.diffusion_sq(jnp.float32(s)) / sde.marginal_std(jnp.float32(s)) ** 2)
    quad, _ = scipy.integrate.quad(integrand, eps, 1.0, limit=200, points=[0.01, 0.1])
    assert float(sde.likelihood_importance_cum_weight(1.0, eps)) == pytest.approx(quad, rel=1e-4)


@pytest.mark.parametrize("kwargs", [dict(beta_min=0.0), dict(beta_min=5.0, beta_max=1.0), dict(N=1), dict(N=20)])
def test_vp_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        sde_lib.VPSDE(**kwargs)


def test_ve_rejects_bad_parameters():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        sde_lib.VESDE(sigma_min=1.0, sigma_max=0.5)


@pytest.mark.parametrize("eps", [0.0, -1e-3, 1.0, 2.0])
def test_sample_time_rejects_eps_outside_the_interval(eps):
    with pytest.raises(ValueError, match="eps must lie in"):
        sde_lib.VPSDE().sample_time(jax.random.PRNGKey(0), 4, eps)


def test_subvp_has_no_discrete_formulation():
    with pytest.raises(NotImplementedError, match="continuous=True"):
        sde_lib.subVPSDE().output_to_score(jnp.ones((2, 2)), jnp.ones(2), continuous=False)
