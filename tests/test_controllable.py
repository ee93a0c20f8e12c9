"""Controllable generation (score-SDE paper, Appendix I; SPEC §7, §9) against closed-form conditionals of mixtures.

Inpainting and colorization replace the known (latent) coordinates by a forward-diffused copy of the data at every
step. That is the paper's approximation p_t(x_unknown | known) ≈ p_t(x_unknown | noisy copy of known), not exact:
the unknown part commits to a mode while the noisy copy still carries little information, and Langevin correctors
undo that only where they can cross between the conditional's modes. Measured on the 2-D mixture below (VE,
N = 200, 4000 samples; z = error / standard error of the conditional's mean):
  conditional components 1.5 apart (3.2 s.d.), 5 Langevin steps per time: z = -0.5; 1 step: z = -4.9;
  2.0 apart (4.2 s.d.), 5 steps: z = -2.8, 1 step: z = -11 (the weights drift towards the prior's 0.5 / 0.5);
  VP, N = 200, 1.5 apart, 5 steps: z = -6.2; VP, N = 1000: z = 0.4.
The tests use the first regime with 5 corrector steps: there the sampler must reproduce the exact conditional
within K_SE standard errors, and a sampler that conditions wrongly (or not at all: the unconditional mean of the
unknown coordinate is 0, the conditional's 0.34) misses by many.

Class-conditional sampling with the mixture's exact time-dependent classifier p_t(y = k | x) ∝ π_k N(x; m μ_k,
m² Σ_k + σ² I) is exact: ∇ log p_t(x) + ∇ log p_t(y | x) is the score of component y's marginal.
Tolerances: K_SE = 4 Monte-Carlo standard errors per checked number, stated next to each check; seeds are fixed.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import datasets
import sampling
import sde_lib

K_SE = 4.0
N_SAMPLES = 4000
VE = sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=200)
INPAINT_OPTIONS = dict(predictor="reverse_diffusion", corrector="langevin", snr=0.16, n_steps=5)


def _z(got, want, se):
    return (np.asarray(got) - np.asarray(want)) / np.asarray(se)


def gaussian_conditional(weights, means, covs, value):
    """p(rest | first = value) of Σ_k π_k N(μ_k, Σ_k): weights [K], means [K, D-1], covariances [K, D-1, D-1].

    w_k ∝ π_k N(value; μ_k1, Σ_k11); mean μ_k,rest + Σ_k,rest1 (value - μ_k1) / Σ_k11; cov Σ_k,rr - Σ_r1 Σ_1r / Σ_11.
    """
    log_w = np.log(weights) + stats.norm.logpdf(value, means[:, 0], np.sqrt(covs[:, 0, 0]))
    w = np.exp(log_w - log_w.max())
    gain = covs[:, 1:, 0] / covs[:, :1, 0]
    m = means[:, 1:] + gain * (value - means[:, :1])
    v = covs[:, 1:, 1:] - np.einsum("ki,kj->kij", covs[:, 1:, 0], gain)
    return w / w.sum(), m, v


def mixture_moments(w, m, v):
    mean = w @ m
    return mean, np.einsum("k,kij->ij", w, v + np.einsum("ki,kj->kij", m, m)) - np.outer(mean, mean)


def assert_matches_conditional(x, w, m, v):
    """Samples x [n, d] against the mixture Σ w_k N(m_k, v_k): mean, covariance, and the mass beyond the midpoint
    of the two component means along their difference d (closed form Σ w_k Φ̄((h - dᵀm_k)/sqrt(dᵀ v_k d)), the
    statistic that moves with the component weights). Returns the |z| of every check."""
    n = len(x)
    mean, cov = mixture_moments(w, m, v)
    d = m[1] - m[0]
    h = d @ (m[0] + m[1]) / 2
    tail = w @ stats.norm.sf((h - m @ d) / np.sqrt(np.einsum("i,kij,j->k", d, v, d)))
    xc = x - x.mean(0)
    products = xc[:, :, None] * xc[:, None, :]
    z = np.concatenate([
        _z(x.mean(0), mean, np.sqrt(np.diag(cov) / n)).ravel(),  # s.e. of a mean: sqrt(var / n)
        _z(np.cov(x.T).reshape(cov.shape), cov, products.std(0) / np.sqrt(n)).ravel(),  # s.e. from the products
        _z(np.mean(x @ d > h), tail, np.sqrt(tail * (1 - tail) / n)).ravel(),  # binomial s.e.
    ])
    assert np.all(np.abs(z) < K_SE), f"|z| = {np.abs(z)} (mean, covariance, tail mass; tolerance {K_SE})"
    return np.abs(z)


# 2-D: two equally likely components, means ±(1, 0.25), each with correlation -0.5. Given x1 = 0.2 the conditional
# of x2 has weights (0.209, 0.791) (prior 0.5 / 0.5), means (-0.85, 0.65), variance 0.225 each: mean 0.337,
# variance 0.597, tail mass 0.758 (the unconditional x2: mean 0, variance 0.3625).
INPAINT_WEIGHTS = np.array([0.5, 0.5])
INPAINT_MEANS = np.array([[-1.0, -0.25], [1.0, 0.25]])
INPAINT_COVS = np.array([[[0.3, -0.15], [-0.15, 0.3]]] * 2)
INPAINT_MIXTURE = datasets.GaussianMixture(INPAINT_WEIGHTS, INPAINT_MEANS, INPAINT_COVS)
KNOWN_X1 = 0.2


def test_inpainting_samples_the_exact_conditional():
    """x1 = 0.2 known: x1 is kept exactly and x2 follows p(x2 | x1 = 0.2). Measured |z|: 0.5 (mean), 0.5
    (variance), 0.2 (tail mass)."""
    data = jnp.tile(jnp.array([[KNOWN_X1, 123.0]]), (N_SAMPLES, 1))  # the unknown entry's value must not matter
    x, nfe = sampling.inpaint(jax.random.PRNGKey(1), VE, INPAINT_MIXTURE.score_fn(VE), data, np.array([True, False]),
                              **INPAINT_OPTIONS)
    x = np.asarray(x, np.float64)
    assert nfe == 200 * (1 + 5)
    np.testing.assert_array_equal(x[:, 0], np.float32(KNOWN_X1))
    w, m, v = gaussian_conditional(INPAINT_WEIGHTS, INPAINT_MEANS, INPAINT_COVS, KNOWN_X1)
    assert_matches_conditional(x[:, 1:], w, m, v)


# 3-D colour pixels: in the decorrelated coordinates z = x M, two equally likely components with means ±(1, 0, 0)
# and covariance COLOR_LATENT_COV (grey z1 correlated with both colour coordinates); x = z Mᵀ, Σ_x = M Σ_z Mᵀ.
COLOR_LATENT_MEANS = np.array([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
COLOR_LATENT_COV = np.array([[0.3, -0.15, 0.1], [-0.15, 0.3, 0.05], [0.1, 0.05, 0.25]])
KNOWN_GREY = 0.2


def test_colorization_samples_the_exact_conditional():
    """z1 = (x M)_1 = 0.2 known (the grey level): z1 kept, (z2, z3) follow the exact conditional, weights (0.209,
    0.791), mean (0.191, -0.128). Measured |z|: 0.3, 1.1 (means), ≤ 1.6 (covariance), 0.1 (tail mass)."""
    transform = sampling.COLOR_DECORRELATION.astype(np.float64)
    covs = np.stack([COLOR_LATENT_COV] * 2)
    mixture = datasets.GaussianMixture([0.5, 0.5], COLOR_LATENT_MEANS @ transform.T,
                                       np.einsum("ij,kjl,ml->kim", transform, covs, transform))
    grey = jnp.tile(jnp.asarray(KNOWN_GREY * transform[:, 0], jnp.float32), (N_SAMPLES, 1))
    x, _ = sampling.colorize(jax.random.PRNGKey(3), VE, mixture.score_fn(VE), grey, **INPAINT_OPTIONS)
    z = np.asarray(x, np.float64) @ transform
    np.testing.assert_allclose(z[:, 0], KNOWN_GREY, atol=1e-6)  # float32 rounding of the rotation
    w, m, v = gaussian_conditional(np.array([0.5, 0.5]), COLOR_LATENT_MEANS, covs, KNOWN_GREY)
    assert_matches_conditional(z[:, 1:], w, m, v)


def test_color_decorrelation_is_orthogonal_with_the_grey_axis_first():
    """The paper's matrix: orthogonal, first column (1, 1, 1)/√3, so grey_projection keeps the channel mean."""
    transform = sampling.COLOR_DECORRELATION
    np.testing.assert_allclose(transform @ transform.T, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(transform[:, 0], np.full(3, 1 / np.sqrt(3)), rtol=1e-6)
    np.testing.assert_allclose(transform[:, 1], [-0.81649649, 0.40824834, 0.40824822], rtol=1e-6)  # the paper's
    rgb = jnp.array([[[0.9, 0.3, 0.0]], [[0.1, 0.2, 0.6]]])
    np.testing.assert_allclose(sampling.grey_projection(rgb), np.repeat(rgb.mean(-1, keepdims=True), 3, -1),
                               atol=1e-6)


# --- Class-conditional sampling with the mixture's exact time-dependent classifier. ---
MIXTURE = datasets.GaussianMixture(
    weights=[0.3, 0.7],
    means=[[-2.1, -1.4], [0.9, 0.6]],
    covs=[[[0.15, 0.05], [0.05, 0.1]], [[0.1, -0.03], [-0.03, 0.08]]],
)
COMPONENTS = [datasets.GaussianMixture([1.0], [mu], [cov]) for mu, cov in zip(MIXTURE.means, MIXTURE.covs)]
VP = sde_lib.VPSDE(N=200)


def _mixture_classifier_log_prob(sde, x, t, y):
    """log p_t(y | x) = log π_y + log N(x; m μ_y, m² Σ_y + σ² I) - log p_t(x) (SPEC §9 marginals)."""
    log_joint = jnp.stack([np.log(w) + c.log_prob(x, t, sde) for w, c in zip(MIXTURE.weights, COMPONENTS)], axis=1)
    log_post = jax.nn.log_softmax(log_joint, axis=1)
    return jnp.take_along_axis(log_post, y[:, None], axis=1)[:, 0]


def _classifier(sde):
    return sampling.classifier_grad_fn(functools.partial(_mixture_classifier_log_prob, sde))


def test_conditional_score_is_the_component_score():
    """s + ∇ log p_t(y | x) = component y's score exactly; scale 2 gives s + 2 (s_y - s) = 2 s_y - s. Tolerance
    float32 rounding of scores of size ~10."""
    x = MIXTURE.sample(jax.random.PRNGKey(0), 64) * 1.3
    y = jnp.arange(64) % 2
    t = jnp.full((64,), 0.3)
    score = MIXTURE.score(x, t, VP)
    want = jnp.where(y[:, None] == 0, COMPONENTS[0].score(x, t, VP), COMPONENTS[1].score(x, t, VP))
    conditional = jax.jit(lambda x, t, scale: sampling.conditional_score_fn(
        MIXTURE.score_fn(VP), _classifier(VP), y, scale)(x, t))
    got = conditional(x, t, 1.0)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    got2 = conditional(x, t, 2.0)
    np.testing.assert_allclose(got2, 2 * want - score, atol=2e-4, rtol=1e-4)


def test_class_conditional_sampling_reproduces_each_component():
    """Half the batch asks for class 0 (weight 0.3), half for class 1: each half has its component's mean and
    covariance (s.e. sqrt(Σ_ii / n) and sqrt((Σ_ii Σ_jj + Σ_ij²) / n), n = 2000) and no sample is nearer the other
    component's mean. Measured worst |z| 2.0."""
    y = jnp.repeat(jnp.arange(2), N_SAMPLES // 2)
    score_fn = sampling.conditional_score_fn(MIXTURE.score_fn(VP), _classifier(VP), y)
    x, _ = sampling.sample(jax.random.PRNGKey(4), VP, score_fn, (N_SAMPLES, 2), method="pc")
    x = np.asarray(x, np.float64)
    for k in range(2):
        xk = x[np.asarray(y) == k]
        n, mu, cov = len(xk), MIXTURE.means[k], MIXTURE.covs[k]
        nearest = np.argmin(((xk[:, None, :] - MIXTURE.means[None]) ** 2).sum(-1), axis=1)
        assert np.all(nearest == k)
        z_mean = _z(xk.mean(0), mu, np.sqrt(np.diag(cov) / n))
        z_cov = _z(np.cov(xk.T), cov, np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n))
        assert np.all(np.abs(z_mean) < K_SE) and np.all(np.abs(z_cov) < K_SE), (k, z_mean, z_cov)


@pytest.mark.parametrize("kwargs, match", [
    (dict(transform=np.array([[1.0, 1.0], [0.0, 1.0]])), "transform must be orthogonal"),
    (dict(transform=np.eye(3)), "transform must be a 2x2 matrix"),
    (dict(mask=np.ones((3,), bool)), "must broadcast to the data's shape"),
    (dict(predictor="leapfrog"), "unknown predictor 'leapfrog'"),
])
def test_bad_inpainting_inputs_raise_value_error(kwargs, match):
    options = dict(mask=np.array([True, False])) | kwargs
    with pytest.raises(ValueError, match=match):
        sampling.inpaint(jax.random.PRNGKey(0), VE, MIXTURE.score_fn(VE), jnp.zeros((4, 2)), **options)
