"""Tests of dequantization.py (SPEC §4, seed 001) against closed forms.

Ground truth: for a model density p on R^D and integers k on K levels, the discrete model is
P(k) = ∫_cell(k) p(x) dx, and E_q[-log p(x(k, u)) + log q(u | k)] - D log|a/K| = -log P(k) + KL(q || q*) with
q*(u | k) ∝ p(x(k, u)). For an isotropic Gaussian p = N(μ, s² I) both -log P(k) (a product of normal-CDF
differences) and the uniform-dequantization value (E_u (x - μ)² in closed form) are exact; for the uniform model
on the data range P(k) = K^-D. An analytic -log p stands in for the score model except where training needs the
bound, which then uses the Gaussian's exact score and prior (SPEC §9).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special, stats

import datasets
import dequantization as dq
import sde_lib

MODEL = dq.Dequantizer(num_couplings=4, features=32)

# The 2-D toy: K = 4 levels on [-1, 1] (bin width ½), p_model = N(MU, S² I) with S below the bin width, so
# the optimal q is a product of truncated Gaussians far from uniform on the outer cells.
K, RANGE, MU, S = 4, (-1.0, 1.0), np.array([0.1, -0.2]), 0.3
GAUSS = datasets.GaussianMixture.isotropic([1.0], MU[None], S)
CELLS = np.stack(np.meshgrid(np.arange(K), np.arange(K), indexing="ij"), -1).reshape(-1, 2)  # all 16 cells
REPS = 512  # draws of u per cell in the Monte-Carlo evaluations


def _gauss_nll(rng, x):
    return -GAUSS.log_prob(x)


def _exact_and_uniform_bpd():
    """-log₂ P(k)/D and the uniform-dequantization bits/dim per cell [16], both in closed form."""
    lo = RANGE[0] + (RANGE[1] - RANGE[0]) * CELLS / K
    hi = lo + (RANGE[1] - RANGE[0]) / K
    exact = -np.log(stats.norm.cdf((hi - MU) / S) - stats.norm.cdf((lo - MU) / S)).sum(1)
    second_moment = ((hi - MU) ** 3 - (lo - MU) ** 3) / (3 * (hi - lo))  # E (x - μ)² for x ~ U[lo, hi]
    uniform = (0.5 * np.log(2 * np.pi * S**2) + second_moment / (2 * S**2)).sum(1) - 2 * np.log(2.0 / K)
    return exact / (2 * np.log(2)), uniform / (2 * np.log(2))


def _perturbed(params, seed, scale):
    """params + scale · N(0, 1) on every leaf: a flow that is far from the identity."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def _init(data_shape):
    """The fresh (identity) flow's parameters for examples of data_shape, initialized once per shape (init is
    most of a test's compile time)."""
    return dq.init_params(jax.random.PRNGKey(0), MODEL, data_shape)


@jax.jit
def _cell_bpd(rng, params):
    """Variational bpd [REPS, 16] with the analytic Gaussian -log p, one u per (repeat, cell)."""
    k = jnp.asarray(np.tile(CELLS, (REPS, 1)))
    return dq.variational_bits_per_dim(rng, MODEL, params, k, _gauss_nll, RANGE, K).reshape(REPS, -1)


# --- The flow's density (SPEC §4). ---
@pytest.mark.parametrize("shape", [(1,), (2,), (2, 2, 3)])
def test_log_q_is_the_change_of_variables_density(shape):
    """log q(u | k) = log N(ε) - log|det ∂u/∂ε| with the Jacobian from jax.jacfwd of the whole forward map, and
    the inverse (log_prob) gives the same number. (2, 2, 3) exercises the checkerboard and the (odd) channel masks."""
    k = jax.random.randint(jax.random.PRNGKey(1), (6,) + shape, 0, K)
    params = _perturbed(_init(k.shape[1:]), seed=3, scale=0.1)
    eps = jax.random.normal(jax.random.PRNGKey(2), k.shape)
    context = dq._context(k, K)

    @jax.jit
    def check(params):
        u, log_q = MODEL.apply({"params": params}, eps, context)
        forward = lambda e, c: MODEL.apply({"params": params}, e.reshape((1,) + shape), c[None])[0].reshape(-1)
        jac = jax.vmap(jax.jacfwd(forward))(eps.reshape(len(k), -1), context)
        by_jacobian = sde_lib.gaussian_logp(eps, 1.0) - jnp.linalg.slogdet(jac)[1]
        return u, log_q, by_jacobian, dq.log_prob(MODEL, params, u, k, K)

    u, log_q, by_jacobian, by_inverse = map(np.asarray, check(params))
    assert u.min() > 0 and u.max() < 1
    assert np.ptp(log_q) > 0.1  # the flow is far from constant: the check has something to find
    # float32 round-off only: measured max 3.8e-6 nats (D ≤ 12 summed log terms).
    np.testing.assert_allclose(by_jacobian, log_q, atol=1e-4)
    np.testing.assert_allclose(by_inverse, log_q, atol=1e-4)


@pytest.mark.parametrize("dim, n", [(1, 20000), (2, 400)])
def test_q_integrates_to_one_over_the_unit_cube(dim, n):
    """∫_(0,1)^D q(u | k) du = 1 by the midpoint rule on an n^D grid, for a far-from-identity flow."""
    k = jnp.asarray(np.tile([[1, 3][:dim]], (n**dim, 1)))
    params = _perturbed(_init(k.shape[1:]), seed=4, scale=0.1)
    mid = (np.arange(n) + 0.5) / n
    u = np.stack(np.meshgrid(*[mid] * dim, indexing="ij"), -1).reshape(-1, dim)
    q = np.exp(np.asarray(jax.jit(dq.log_prob, static_argnums=(0, 4))(MODEL, params, jnp.asarray(u), k, K),
                          np.float64))
    # Quadrature error only (the density vanishes at the faces): measured |1 - ∫| 8e-8 (1-D), 3e-8 (2-D).
    assert abs(q.sum() / n**dim - 1.0) < 1e-3
    # Far from uniform, so a wrong normalization would show: KL(q || U) = ∫ q log q, measured 0.100 (1-D) and
    # 0.473 (2-D).
    assert np.sum(q * np.log(np.maximum(q, 1e-300))) / n**dim > 0.05


# --- The identity flow and the bound (SPEC §4). ---
def test_fresh_flow_is_logit_normal_and_bound_exceeds_uniform_model_nll():
    """Zero last layers: u = sigmoid(ε) with the logit-normal density, whatever k. With the uniform model on the
    data range P(k) = K^-D, so the variational bpd is log₂ K + KL(logit-normal || U(0, 1)) / ln 2 > log₂ K."""
    shape, rng = (2, 2, 3), jax.random.PRNGKey(5)
    k = jax.random.randint(jax.random.PRNGKey(6), (1024,) + shape, 0, K)
    params = _init(k.shape[1:])
    u, log_q = jax.jit(dq.sample, static_argnums=(1, 4))(rng, MODEL, params, k, K)
    np.testing.assert_allclose(np.asarray(u), np.asarray(jax.nn.sigmoid(jax.random.normal(rng, k.shape))),
                               atol=1e-6)
    u64 = np.asarray(u, np.float64)
    logit_normal = (stats.norm.logpdf(special.logit(u64)) - np.log(u64 * (1 - u64))).reshape(len(k), -1).sum(1)
    # float32 sums of 12 logs: measured max error 5e-6 nats.
    np.testing.assert_allclose(np.asarray(log_q), logit_normal, atol=1e-3)

    d, a = np.prod(shape), RANGE[1] - RANGE[0]
    uniform_nll = lambda r, x: jnp.full(x.shape[:1], d * np.log(a))
    bpd = np.asarray(jax.jit(dq.variational_bits_per_dim, static_argnums=(1, 4, 5, 6))(
        jax.random.PRNGKey(7), MODEL, params, k, uniform_nll, RANGE, K))
    grid = (np.arange(200000) + 0.5) / 200000  # KL(q || U) = ∫ q log q by quadrature of the logit-normal density
    q = stats.norm.pdf(special.logit(grid)) / (grid * (1 - grid))
    kl = np.sum(q * np.log(q)) / len(grid)  # 0.193 nats per dimension
    expected = np.log2(K) + kl / np.log(2)
    se = bpd.std(ddof=1) / np.sqrt(len(bpd))
    # Monte-Carlo error only: measured 2.2827 against 2.2787, se 0.0055 (z = 0.7).
    assert abs(bpd.mean() - expected) < 4 * se, (bpd.mean(), expected, se)
    assert bpd.mean() - np.log2(K) > 10 * se  # strictly above the true -log₂ P(k) / D (measured 52 se)


def test_bound_is_above_the_true_nll_for_any_flow():
    """E_q[bpd] ≥ -log₂ P(k)/D per cell for random flows (the gap is KL(q || q*)), within Monte-Carlo error."""
    exact, _ = _exact_and_uniform_bpd()
    params = _init((2,))
    for seed in range(3):
        bpd = np.asarray(_cell_bpd(jax.random.PRNGKey(10 + seed), _perturbed(params, seed, 0.2)), np.float64)
        se = bpd.std(0, ddof=1) / np.sqrt(REPS)
        # Measured: every cell at least 11 standard errors above; mean gap 0.60 .. 1.25 bits/dim.
        assert np.all(bpd.mean(0) > exact - 4 * se), (seed, bpd.mean(0) - exact, se)
        assert (bpd.mean(0) - exact).mean() > 0.05


# --- Fitting q to a frozen score model (seed 001). ---
def test_training_moves_the_bound_to_the_true_nll():
    """Trained with the DSM bound of the Gaussian's exact score and prior, q approaches q* ∝ p_model on each cell:
    the variational bpd falls from above the uniform-dequantization value to near -log₂ P(k)/D (closed forms)."""
    exact, uniform = _exact_and_uniform_bpd()  # means over the 16 cells: 2.942 and 3.461 bits/dim
    sde = sde_lib.VPSDE()
    score, prior = GAUSS.score_fn(sde), datasets.exact_prior_logp(GAUSS, sde)
    batch = jnp.asarray(np.tile(CELLS, (4, 1)))
    before = np.asarray(_cell_bpd(jax.random.PRNGKey(9), _init((2,))), np.float64)
    state, history = dq.fit(jax.random.PRNGKey(1), MODEL, sde, score, lambda step: batch, 300, RANGE, K,
                            learning_rate=3e-3, n_t=4, prior_logp=prior)
    after = np.asarray(_cell_bpd(jax.random.PRNGKey(9), state.params), np.float64)
    se = after.mean(1).std(ddof=1) / np.sqrt(REPS)  # of the mean over cells; measured 0.0024
    assert history.shape == (300,) and np.all(np.isfinite(history)) and int(state.step) == 300
    assert before.mean() > uniform.mean()  # the logit-normal start: measured 3.654
    # Measured 2.985: 8% of the uniform gap (0.519 bpd) is left; the flow's logit-affine family cannot match a
    # truncated Gaussian exactly, so the bar is 25%.
    assert after.mean() - exact.mean() < 0.25 * (uniform.mean() - exact.mean()), after.mean()
    assert after.mean() > exact.mean() - 4 * se
    # Per cell within 0.15 bits/dim of -log₂ P(k)/D (measured 0.016 .. 0.084), where uniform dequantization is
    # up to 1.2 above. (On the central cell, where q* is nearly uniform, the logit-normal family stays 0.01 above
    # uniform: measured.)
    assert np.all(after.mean(0) - exact < 0.15), after.mean(0) - exact

    # The bound as -log p (what an evaluation reports) agrees with the analytic -log p on average: the bound is
    # tight for the exact score and prior (measured 2.974 ± 0.039 against 2.985, 4 x 512 draws per cell).
    nll = dq.bound_nll_fn(sde, score, n_t=4, prior_logp=prior)
    k = jnp.asarray(np.tile(CELLS, (4 * REPS, 1)))
    # Not wrapped in an outer jax.jit: XLA:CPU (jax 0.10.2) deadlocks compiling that one at this size (32,768
    # examples x 4 times in one lax.map chunk; 16,384 passes), while likelihood_bound's own jit runs it in ~2 s.
    by_bound = np.asarray(dq.variational_bits_per_dim(jax.random.PRNGKey(11), MODEL, state.params, k, nll, RANGE, K),
                          np.float64)
    assert abs(by_bound.mean() - after.mean()) < 4 * by_bound.std(ddof=1) / np.sqrt(len(by_bound))


def test_ode_nll_plugs_in_and_matches_the_analytic_density():
    """The same draws of u scored by the probability-flow ODE (exact score and prior) and by the analytic
    log-density give the same bits/dim up to the solver's tolerance."""
    sde = sde_lib.VPSDE()
    k = jnp.asarray(CELLS)
    params = _perturbed(_init(k.shape[1:]), seed=1, scale=0.1)
    ode = dq.ode_nll_fn(sde, GAUSS.score_fn(sde), exact_divergence=True,
                        prior_logp=datasets.exact_prior_logp(GAUSS, sde))
    rng = jax.random.PRNGKey(12)
    by_ode = dq.variational_bits_per_dim(rng, MODEL, params, k, ode, RANGE, K)
    by_density = dq.variational_bits_per_dim(rng, MODEL, params, k, _gauss_nll, RANGE, K)
    # The solver's error only (~1e-4 nats, tests/test_likelihood.py): measured max 1.6e-4 bits/dim.
    np.testing.assert_allclose(np.asarray(by_ode), np.asarray(by_density), atol=1e-3)


def test_image_step_updates_the_flow():
    """One jitted step on [B, H, W, C] integers with 256 levels: finite bpd, parameters move, step counts."""
    sde = sde_lib.VPSDE()
    optimizer = optax.adam(1e-3)
    k = jax.random.randint(jax.random.PRNGKey(0), (4, 2, 2, 3), 0, 256)
    params = _init(k.shape[1:])
    state = dq.DequantizerState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    step = jax.jit(dq.get_step_fn(MODEL, optimizer, sde, (0.0, 1.0), 256, n_t=2))
    standard_normal_score = jax.tree_util.Partial(lambda x, t: -x)  # VP keeps N(0, I) fixed
    new, metrics = step(state, k, jax.random.PRNGKey(2), standard_normal_score)
    assert int(new.step) == 1 and np.isfinite(float(metrics["bpd"])) and float(metrics["grad_norm"]) > 0
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-4


# --- Conversions and errors. ---
def test_quantize_inverts_dequantize():
    k = jax.random.randint(jax.random.PRNGKey(0), (64, 2), 0, 256)
    params = _perturbed(_init(k.shape[1:]), seed=2, scale=0.1)
    x, _ = jax.jit(dq.dequantize, static_argnums=(1, 4, 5))(jax.random.PRNGKey(3), MODEL, params, k, (-1.0, 1.0), 256)
    np.testing.assert_array_equal(np.asarray(dq.quantize(x, (-1.0, 1.0), 256)), np.asarray(k))
    centres = (np.asarray(k, np.float32) + 0.5) / 256  # what the image datasets serve without dequantization
    np.testing.assert_array_equal(np.asarray(dq.quantize(centres, (0.0, 1.0), 256)), np.asarray(k))


def test_bad_inputs_are_rejected_with_a_fix():
    with pytest.raises(ValueError, match="flat"):
        dq.init_params(jax.random.PRNGKey(0), MODEL, (4, 4))
    with pytest.raises(ValueError, match="n_t"):
        dq.get_step_fn(MODEL, optax.adam(1e-3), sde_lib.VPSDE(), n_t=1)
    with pytest.raises(ValueError, match="levels"):
        dq.dequantize(jax.random.PRNGKey(0), MODEL, None, jnp.zeros((1, 2), jnp.int32), levels=1)
