"""The Gaussian-mixture oracle against scipy and autodiff (SPEC §9)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import datasets
import sde_lib

MIXTURE = datasets.GaussianMixture(
    weights=[0.2, 0.5, 0.3],
    means=[[-2.0, 0.0, 1.0], [1.5, 1.0, -1.0], [0.0, -2.5, 0.5]],
    covs=[np.diag([0.3, 0.5, 0.2]), [[0.5, 0.2, 0.0], [0.2, 0.4, 0.1], [0.0, 0.1, 0.3]], 0.25 * np.eye(3)],
)
SDES = [sde_lib.VESDE(0.01, 10.0), sde_lib.VPSDE(), sde_lib.subVPSDE()]


def scipy_log_prob(x, means, covs):
    dens = sum(w * scipy.stats.multivariate_normal(mu, c).pdf(x) for w, mu, c in zip(MIXTURE.weights, means, covs))
    return np.log(dens)


def test_log_prob_at_time_zero_matches_scipy():
    x = np.random.default_rng(0).normal(size=(7, 3))
    np.testing.assert_allclose(MIXTURE.log_prob(jnp.asarray(x, jnp.float32)),
                               scipy_log_prob(x, MIXTURE.means, MIXTURE.covs), rtol=1e-5)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: s.name)
@pytest.mark.parametrize("t", [1e-3, 0.3, 0.9])
def test_marginal_log_prob_matches_scipy(sde, t):
    """p_t = Σ π_k N(m μ_k, m² Σ_k + σ² I)."""
    m, s = float(sde.mean_coef(jnp.float32(t))), float(sde.marginal_std(jnp.float32(t)))
    x = np.random.default_rng(1).normal(size=(7, 3)) * max(1.0, s)
    covs = m**2 * MIXTURE.covs + s**2 * np.eye(3)
    got = MIXTURE.log_prob(jnp.asarray(x, jnp.float32), jnp.full((7,), t), sde)
    np.testing.assert_allclose(got, scipy_log_prob(x, m * MIXTURE.means, covs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: s.name)
def test_score_is_gradient_of_log_prob(sde):
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    t = jnp.linspace(0.01, 1.0, 6)
    grad = jax.vmap(jax.grad(lambda xi, ti: MIXTURE.log_prob(xi[None], ti[None], sde)[0]))(x, t)
    np.testing.assert_allclose(MIXTURE.score(x, t, sde), grad, rtol=1e-4, atol=1e-5)


def test_sample_moments_and_weights():
    n = 200_000
    x = np.asarray(MIXTURE.sample(jax.random.PRNGKey(3), n), np.float64)
    mean, cov = MIXTURE.marginal_moments()
    # 5 standard errors per coordinate: s.e. of a mean is sqrt(var/n); of a covariance entry ≈ sqrt((σ_ii σ_jj + σ_ij²)/n).
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(np.diag(cov) / n))
    var = np.diag(cov)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 5 * np.sqrt((np.outer(var, var) + cov**2) / n))


@pytest.mark.parametrize("sde", SDES, ids=lambda s: s.name)
def test_marginal_moments_at_t(sde):
    t = 0.4
    m, s = float(sde.mean_coef(jnp.float32(t))), float(sde.marginal_std(jnp.float32(t)))
    mean, cov = MIXTURE.marginal_moments(sde, t)
    mean0, cov0 = MIXTURE.marginal_moments()
    np.testing.assert_allclose(mean, m * mean0, rtol=1e-6)
    np.testing.assert_allclose(cov, m**2 * cov0 + s**2 * np.eye(3), rtol=1e-6, atol=1e-10)


def test_entropy_of_a_single_gaussian():
    cov = np.array([[1.0, 0.3], [0.3, 0.5]])
    g = datasets.GaussianMixture([1.0], [[0.0, 1.0]], [cov])
    h, se = g.entropy(jax.random.PRNGKey(0), n=50_000)
    exact = 0.5 * np.log(np.linalg.det(2 * np.pi * np.e * cov))
    assert abs(h - exact) < 4 * se


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=[0.5, 0.6], means=[[0.0], [1.0]], covs=[[[1.0]], [[1.0]]]), "sum to 1"),
    (dict(weights=[1.0], means=[[0.0, 1.0]], covs=[[[1.0]]]), "shapes do not match"),
])
def test_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        datasets.GaussianMixture(**kwargs)
