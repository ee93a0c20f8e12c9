"""Energy networks, the conservative score and the Langevin / MALA sampler for energies (SPEC §6, seed 003).

Ground truth: the Gaussian energy E(x) = ½ (x-μ)ᵀP(x-μ) + c has score -P(x-μ), p = N(μ, P⁻¹), and the unadjusted
Langevin chain x ← x - (ε²/2) P(x-μ) + ε z is a linear Gaussian recursion whose stationary law is N(μ, Σ_ε) with
Σ_ε = (P (I - ε²P/4))⁻¹ exactly (per eigenvalue λ of P: ε² / (1 - (1 - ε²λ/2)²) = 1 / (λ (1 - ε²λ/4))).
MALA leaves N(μ, P⁻¹) invariant for any ε. Moment tolerances are K_SE = 4.5 Monte-Carlo standard errors of the
chains' sample moments (chains are independent; the seeds are fixed, so the tests are deterministic).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import evaluation
import losses
import models
import sde_lib
from configs.default_toy_configs import get_default_configs
from models import energy

MU = np.array([0.5, -1.0])
SIGMA = np.array([[1.0, 0.6], [0.6, 2.0]])
PREC = np.linalg.inv(SIGMA)
K_SE = 4.5


def gauss_energy(params, x, t=None):
    d = x - params["mu"]
    return 0.5 * jnp.einsum("bi,ij,bj->b", d, params["prec"], d) + params["c"]


TRUE = {"mu": jnp.asarray(MU, jnp.float32), "prec": jnp.asarray(PREC, jnp.float32), "c": jnp.float32(0.3)}
TRUE_ENERGY = jax.tree_util.Partial(gauss_energy, TRUE)


def _exact_samples(seed, n):
    z = np.random.default_rng(seed).normal(size=(n, 2))
    return jnp.asarray(MU + z @ np.linalg.cholesky(SIGMA).T, jnp.float32)


def _assert_moments(x, mean, cov, label):
    """Sample mean and covariance of x against (mean, cov), each within K_SE standard errors of the sample moments
    of n independent N(mean, cov) draws: s.e.(mean_i) = sqrt(cov_ii / n), s.e.(cov_ij) = sqrt((cov_ii cov_jj +
    cov_ij²) / n)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    var = np.diag(cov)
    mean_z = np.abs(x.mean(0) - mean) / np.sqrt(var / n)
    cov_z = np.abs(np.cov(x, rowvar=False) - cov) / np.sqrt((np.outer(var, var) + cov**2) / n)
    assert mean_z.max() < K_SE and cov_z.max() < K_SE, (label, x.mean(0), np.cov(x, rowvar=False), mean_z, cov_z)


def _ula_covariance(step_size):
    return np.linalg.inv(PREC @ (np.eye(2) - step_size**2 * PREC / 4))


# --- The conservative score. ---

def test_score_from_energy_is_minus_gradient_and_invertible():
    x, t = _exact_samples(0, 16), jnp.zeros(16)
    score_fn = energy.score_from_energy(TRUE_ENERGY)
    np.testing.assert_allclose(np.asarray(score_fn(x, t)), -(np.asarray(x) - MU) @ PREC, rtol=1e-5, atol=1e-5)
    assert energy.is_energy_score(score_fn)
    recovered = energy.energy_from_score(score_fn)
    np.testing.assert_array_equal(np.asarray(recovered(x, t)), np.asarray(TRUE_ENERGY(x, t)))
    # The energy's parameters stay pytree leaves of the score, so jit takes new ones without re-tracing.
    assert len(jax.tree.leaves(score_fn)) == 3


def test_energy_from_a_plain_score_says_what_to_do():
    with pytest.raises(ValueError, match="energy_mlp or energy_conv"):
        energy.energy_from_score(lambda x, t: -x)


def _energy_config(name, conditional=False, image_shape=None):
    config = get_default_configs()
    config.model.name, config.model.nf, config.model.num_layers = name, 8, 2
    config.model.conditional = conditional
    config.model.energy_quadratic = 0.1
    if image_shape is not None:
        config.data.centered = True
        config.model.ch_mult = (1, 2)
    return config


def _random_init(config, x, seed=0):
    """The network's variable tree (jax.eval_shape: no initializer is compiled, which would cost seconds per layer)
    filled with N(0, 0.3²) numpy noise, so no layer is zero and the zero-initialized read-out hides nothing."""
    model = models.create_model(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros(x.shape[:1]))
    rng = np.random.default_rng(seed)
    return model, jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)


NETWORKS = {
    "mlp": ("energy_mlp", False, (5, 2)),
    "mlp_conditional": ("energy_mlp", True, (5, 2)),
    "conv_mnist": ("energy_conv", False, (2, 28, 28, 1)),
    "conv_rgb_conditional": ("energy_conv", True, (2, 8, 8, 3)),
}


@pytest.mark.parametrize("case", sorted(NETWORKS))
def test_energy_network_score_is_a_per_example_symmetric_gradient(case):
    name, conditional, shape = NETWORKS[case]
    config = _energy_config(name, conditional, shape[1:] if len(shape) == 4 else None)
    x = jax.random.normal(jax.random.PRNGKey(2), shape)
    model, variables = _random_init(config, x)
    sde = sde_lib.get_sde(config)
    t = jnp.full(shape[:1], 0.3)

    @jax.jit
    def checks(variables, x, t):
        score_fn = models.get_score_fn(sde, model, variables)
        energy_fn = energy.energy_from_score(score_fn)
        single = jax.vmap(lambda xi, ti: -jax.grad(lambda y: energy_fn(y[None], ti[None])[0])(xi))(x, t)
        ratio = evaluation.conservativity(jax.random.PRNGKey(3), score_fn, x, t, n_probes=2, exact=len(shape) == 2)
        return energy_fn(x, t), score_fn(x, t), single, ratio, score_fn(x, jnp.full(shape[:1], 0.9))

    e, s, single, ratio, s_later = checks(variables, x, t)
    assert e.shape == shape[:1] and s.shape == shape
    # Per example: -∇ of one example's energy alone equals its row of the batched score (no batch interaction).
    np.testing.assert_allclose(np.asarray(s), np.asarray(single), rtol=1e-4, atol=1e-6)
    # J = -Hessian is symmetric: the conservativity ratio ||J - Jᵀ||²/||J||² is float32 rounding (~1e-13), where a
    # non-gradient field has O(1).
    assert float(jnp.max(ratio)) < 1e-8
    # A conditional energy depends on t, an unconditional one does not.
    changed = float(jnp.max(jnp.abs(s_later - s)))
    assert (changed > 1e-3) if conditional else (changed == 0.0)


def test_plain_score_network_is_not_conservative():
    """The same check on MLPScore gives O(1): the conservativity test above can tell the difference."""
    config = get_default_configs()
    config.model.nf, config.model.num_layers = 8, 2
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 2))
    model, variables = _random_init(config, x)
    sde = sde_lib.get_sde(config)
    ratio = jax.jit(lambda v, x: evaluation.conservativity(None, models.get_score_fn(sde, model, v), x,
                                                           jnp.full(5, 0.3), exact=True))(variables, x)
    assert float(jnp.min(ratio)) > 1e-2


def test_energy_at_init_is_the_quadratic_base():
    """Zero read-out: the initial energy is ½ q ||x||² + c with c = 0, a normalizable N(0, I/q) model."""
    config = _energy_config("energy_mlp")
    model = models.create_model(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2))
    variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x, jnp.zeros(4))   # rbg: compiles faster
    assert float(variables["params"]["EnergyReadout_0"]["log_normalizer"]) == 0.0
    np.testing.assert_allclose(np.asarray(model.apply(variables, x, jnp.zeros(4))),
                               0.05 * np.sum(np.asarray(x) ** 2, axis=1), rtol=1e-6)


def test_energy_scale_multiplies_the_read_out_only():
    """E = S wᵀh + ½ q ||x||² + c: with the read-out and c set to nonzero values, S = 1e4 multiplies wᵀh exactly
    (the difference of the two energies is (S - 1) wᵀh) and leaves the quadratic base and c alone."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2))
    energies = []
    for scale in (1.0, 1e4):
        config = _energy_config("energy_mlp")
        config.model.energy_scale = scale
        model = models.create_model(config)
        params = model.init(jax.random.PRNGKey(1), x, jnp.zeros(4))["params"]
        readout = params["EnergyReadout_0"]
        params["EnergyReadout_0"] = {"Dense_0": {"kernel": jnp.full_like(readout["Dense_0"]["kernel"], 0.01)},
                                     "log_normalizer": jnp.asarray(0.7)}
        energies.append(np.asarray(model.apply({"params": params}, x, jnp.zeros(4)), np.float64))
    base = 0.05 * np.sum(np.asarray(x, np.float64) ** 2, axis=1) + 0.7
    readout_part = energies[0] - base
    assert np.all(np.abs(readout_part) > 1e-3)
    np.testing.assert_allclose(energies[1] - base, 1e4 * readout_part, rtol=1e-4)
    config.model.energy_scale = 0.0
    with pytest.raises(ValueError, match="energy_scale > 0"):
        models.create_model(config).init(jax.random.PRNGKey(1), x, jnp.zeros(4))


def test_get_energy_fn_rejects_a_score_network():
    config = get_default_configs()
    model = models.create_model(config)
    with pytest.raises(ValueError, match="energy network"):
        energy.get_energy_fn(sde_lib.get_sde(config), model, {})


# --- Langevin and MALA on the Gaussian energy. ---

@pytest.mark.parametrize("step_size", [0.1, 0.5])
def test_ula_stationary_covariance_is_the_closed_form(step_size):
    """From exact samples, 300 ULA steps relax to N(μ, Σ_ε): the slowest mode contracts by (1 - ε²λ_min/2)^300
    ≈ 5e-8 for ε = 0.5; for ε = 0.1 what is left is (1 - 0.0022)^600 ≈ 0.27 of a ≤ 0.35% bias, far below the 1%
    standard error. At ε = 0.5 Σ_ε differs from Σ by 3-10%: measured |z| 1.2 against Σ_ε and 7.8 against Σ, so the
    test sees the step-size convention. ε = 0.1: |z| 1.5 against both."""
    x0 = _exact_samples(1, 20000)
    x, acceptance = jax.jit(lambda r, x: losses.langevin_mcmc(r, TRUE_ENERGY, x, 300, step_size))(
        jax.random.PRNGKey(4), x0)
    np.testing.assert_array_equal(np.asarray(acceptance), 1.0)
    _assert_moments(x, MU, _ula_covariance(step_size), f"ULA eps={step_size}")
    if step_size == 0.1:   # small steps reproduce the Gaussian itself
        _assert_moments(x, MU, SIGMA, "ULA small step vs the target")


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_mala_keeps_the_target_with_a_large_step(grad_clip):
    """ε = 1.2 (ε²λ_max/2 = 1.0): ULA's covariance would be off by up to 2x, yet 40 MALA steps from exact samples
    stay N(μ, Σ), also with the drift clipped (a different but still exact proposal). Measured |z| 1.1 (0.8 clipped)
    where ULA with the same step gives 69 (963 clipped), and MALA without the proposal-density ratio 45."""
    step_size, x0 = 1.2, _exact_samples(2, 20000)
    run = jax.jit(lambda r, x: losses.langevin_mcmc(r, TRUE_ENERGY, x, 40, step_size, grad_clip, mala=True))
    x, acceptance = run(jax.random.PRNGKey(5), x0)
    _assert_moments(x, MU, SIGMA, f"MALA clip={grad_clip}")
    assert 0.2 < float(jnp.mean(acceptance)) < 0.95            # measured 0.78 (no clip), 0.63 (clip)
    assert float(jnp.mean(jnp.any(x != x0, axis=1))) > 0.99    # the chains did move
    ula = np.linalg.eigvalsh(_ula_covariance(step_size)) / np.linalg.eigvalsh(SIGMA)
    assert ula.max() > 1.9                                     # what an unadjusted chain would give instead


def test_mala_converges_from_far():
    """From a point mass at (3, 3), 200 MALA steps with ε = 0.8 reach N(μ, Σ) (the mixing is geometric; the slowest
    mode's contraction is far below the tolerance after 200 steps). Measured: acceptance 0.93, |z| 1.9."""
    x0 = jnp.full((20000, 2), 3.0)
    x, _ = jax.jit(lambda r, x: losses.langevin_mcmc(r, TRUE_ENERGY, x, 200, 0.8, mala=True))(
        jax.random.PRNGKey(6), x0)
    _assert_moments(x, MU, SIGMA, "MALA from a point mass")


def test_langevin_chains_carry_no_gradient():
    """d(chain output)/d(parameters) and d/dx0 are exactly zero: the chains are stop-gradiented."""
    x0 = _exact_samples(3, 8)

    def out(params, x0):
        x, _ = losses.langevin_mcmc(jax.random.PRNGKey(0), jax.tree_util.Partial(gauss_energy, params), x0, 5, 0.3)
        return jnp.sum(x)

    grads = jax.grad(out, argnums=(0, 1))(TRUE, x0)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_langevin_rejects_bad_settings():
    with pytest.raises(ValueError, match="step_size > 0"):
        losses.langevin_mcmc(jax.random.PRNGKey(0), TRUE_ENERGY, _exact_samples(0, 4), 5, 0.0)
