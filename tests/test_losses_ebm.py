"""The energy-based-model objectives of losses.py against closed forms (SPEC §6, seed 003).

Model: the Gaussian energy E_θ(x) = ½ (x-μ)ᵀP(x-μ) + c, θ = (μ, A, c) with P = (A + Aᵀ)/2, so
log Z_θ = -c + (D/2) log 2π - ½ log det P and the model is normalized at c = (D/2) log 2π + ½ log det P⁻¹.
Data: N(μ*, Σ*) in 2-D. Closed forms used:
- score s = -P(x-μ), ∇x s = -P: exact SM per example is ½ ||P(x-μ)||² - tr P, and its population value
  ½ tr(P Σ* P) + ½ ||P(μ* - μ)||² - tr P is minimal at (μ*, Σ*⁻¹); on a sample, exactly at (x̄, S⁻¹), S the
  (1/n) sample covariance.
- SSM: averaging over the four Rademacher sign vectors of R² gives E_v exactly, which equals exact SM.
- single-level DSM at noise σ: ½ E||s(x+σz) + z/σ||² = ½ (D/σ² - tr (Σ*+σ²I)⁻¹) at the noisy truth P = (Σ*+σ²I)⁻¹.
- MCMC-MLE with exact model samples x⁻ ~ p_θ: the gradient is unbiased for ∇θ [E_θ(x⁺) + log Z_θ].
Stochastic objectives are checked by their gradient at the truth: the per-example gradients (jax.jacfwd over the
7 parameters) are i.i.d., so each component's mean must lie within K_SE = 4.5 standard errors of 0, while at a
perturbed θ the same statistic must exceed POWER = 8 (the test can see a wrong minimiser). Seeds are fixed.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import losses
import models
import sde_lib
from configs.default_toy_configs import get_default_configs
from models import energy

D = 2
MU = np.array([0.5, -1.0])
SIGMA = np.array([[1.0, 0.6], [0.6, 2.0]])
PREC = np.linalg.inv(SIGMA)
C_TRUE = 0.5 * D * np.log(2 * np.pi) + 0.5 * np.linalg.slogdet(SIGMA)[1]   # log Z of exp(-½ (x-μ)ᵀP(x-μ)) = 2.0852
K_SE, POWER = 4.5, 8.0
N = 20000


def _params(mu=MU, prec=PREC, c=C_TRUE):
    return {"mu": jnp.asarray(mu, jnp.float32), "a": jnp.asarray(prec, jnp.float32), "c": jnp.float32(c)}


TRUE = _params()
PERTURBED = _params(MU + np.array([0.15, -0.1]), PREC * 1.15, C_TRUE + 0.1)


def _prec(params):
    return 0.5 * (params["a"] + params["a"].T)


def gauss_energy(params, x):
    d = x - params["mu"]
    return 0.5 * jnp.einsum("bi,ij,bj->b", d, _prec(params), d) + params["c"]


def gauss_score(params, x):
    return -(x - params["mu"]) @ _prec(params)


def log_z(params):
    return -params["c"] + 0.5 * D * jnp.log(2 * jnp.pi) - 0.5 * jnp.linalg.slogdet(_prec(params))[1]


def _energy(params):
    return jax.tree_util.Partial(gauss_energy, params)


def _score(params):
    return jax.tree_util.Partial(gauss_score, params)


def _samples(seed, n, mean=MU, cov=SIGMA):
    z = np.random.default_rng(seed).normal(size=(n, D))
    return jnp.asarray(mean + z @ np.linalg.cholesky(cov).T, jnp.float32)


DATA = _samples(0, N)


def _per_example_gradients(loss_fn, params):
    """∂ loss_b / ∂θ as [B, 7] (μ, A, c flattened) by forward mode: loss_fn(params) -> [B]."""
    jac = jax.jit(jax.jacfwd(loss_fn))(params)
    return np.concatenate([np.asarray(jac[k], np.float64).reshape(N, -1) for k in ("mu", "a", "c")], axis=1)


def _max_z(grads):
    """max over components of |mean| / standard error of i.i.d. per-example gradients [B, K]; components that are
    exactly zero for every example (c for the score-based objectives) count as z = 0."""
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(len(grads))
    return float(np.max(np.where(se > 0, np.abs(mean) / np.where(se > 0, se, 1.0), np.abs(mean) * 1e30)))


def _noise():
    """NCE's noise: a Gaussian wider than the data, fixed (so the per-example losses are independent)."""
    return losses.gaussian_noise(jnp.asarray(MU, jnp.float32), jnp.asarray(2.0 * SIGMA, jnp.float32))


SIGMA_DSM = 0.5
NOISY_TRUE = _params(prec=np.linalg.inv(SIGMA + SIGMA_DSM**2 * np.eye(D)))

# name -> (per-example loss of params at key 1 on DATA, the parameters where its expected gradient vanishes)
OBJECTIVES = {
    "exact_sm": (lambda p: losses.exact_score_matching_loss(_score(p), DATA), TRUE),
    "ssm_gaussian": (lambda p: losses.sliced_score_matching_loss(jax.random.PRNGKey(1), _score(p), DATA), TRUE),
    "ssm_rademacher": (lambda p: losses.sliced_score_matching_loss(jax.random.PRNGKey(1), _score(p), DATA,
                                                                   probe="rademacher"), TRUE),
    "ssm_vr": (lambda p: losses.sliced_score_matching_loss(jax.random.PRNGKey(1), _score(p), DATA,
                                                           variance_reduced=True), TRUE),
    "dsm": (lambda p: losses.denoising_score_matching_loss(jax.random.PRNGKey(1), _score(p), DATA, SIGMA_DSM),
            NOISY_TRUE),
    "nce_nu1": (lambda p: losses.nce_loss(jax.random.PRNGKey(1), _energy(p), DATA, _noise(), nu=1), TRUE),
    "nce_nu4": (lambda p: losses.nce_loss(jax.random.PRNGKey(1), _energy(p), DATA, _noise(), nu=4), TRUE),
    "cd_mala": (lambda p: losses.contrastive_divergence_loss(jax.random.PRNGKey(1), _energy(p), DATA, 5, 0.8,
                                                             mala=True)[0], TRUE),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_expected_gradient_vanishes_at_the_truth_only(name):
    """Measured max |z| (seeds fixed): at the truth 0.7-2.0 (CD 2.0); at the perturbed θ 15 (SSM, Gaussian probes)
    to 122 (NCE, ν = 4)."""
    loss_fn, optimum = OBJECTIVES[name]
    z_true = _max_z(_per_example_gradients(loss_fn, optimum))
    perturbed = jax.tree.map(lambda o, p, t: o + (p - t), optimum, PERTURBED, TRUE)
    z_off = _max_z(_per_example_gradients(loss_fn, perturbed))
    assert z_true < K_SE and z_off > POWER, (name, z_true, z_off)


# --- Score matching: exact values. ---

def _sm_closed_form(params, x):
    p, mu = np.asarray(_prec(params), np.float64), np.asarray(params["mu"], np.float64)
    return 0.5 * np.sum(((np.asarray(x, np.float64) - mu) @ p) ** 2, axis=1) - np.trace(p)


def test_exact_sm_per_example_is_the_closed_form_also_through_the_energy_seam():
    x = DATA[:64]
    want = _sm_closed_form(PERTURBED, x)
    np.testing.assert_allclose(np.asarray(losses.exact_score_matching_loss(_score(PERTURBED), x)), want,
                               rtol=1e-5, atol=1e-5)
    # The same through score_from_energy (-∇x E by autodiff) and at_time.
    seam = losses.at_time(energy.score_from_energy(jax.tree_util.Partial(lambda p, x, t: gauss_energy(p, x),
                                                                         PERTURBED)), 0.0)
    np.testing.assert_allclose(np.asarray(losses.exact_score_matching_loss(seam, x)), want, rtol=1e-5, atol=1e-5)


def test_exact_sm_population_value():
    """Mean over N data of exact SM = ½ tr(PΣ*P) + ½ ||P(μ*-μ)||² - tr P within K_SE standard errors."""
    p, mu = np.asarray(_prec(PERTURBED), np.float64), np.asarray(PERTURBED["mu"], np.float64)
    want = 0.5 * np.trace(p @ SIGMA @ p) + 0.5 * np.sum((p @ (MU - mu)) ** 2) - np.trace(p)
    got = np.asarray(losses.exact_score_matching_loss(_score(PERTURBED), DATA), np.float64)
    assert abs(got.mean() - want) < K_SE * got.std() / np.sqrt(N), (got.mean(), want)


def test_exact_sm_sample_minimiser_is_the_sample_mean_and_inverse_covariance():
    """The sample objective ½ tr(PSP) + ½ ||P(x̄-μ)||² - tr P has zero gradient exactly at (x̄, S⁻¹): float32
    rounding leaves ~1e-6; at the true (μ*, Σ*⁻¹) the gradient is O(1/√n) ≈ 1e-2 instead."""
    x = np.asarray(DATA[:2000], np.float64)
    empirical = _params(x.mean(0), np.linalg.inv(np.cov(x, rowvar=False, ddof=0)))
    mean_loss = lambda p: jnp.mean(losses.exact_score_matching_loss(_score(p), DATA[:2000]))
    grad_at = lambda p: max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(jax.grad(mean_loss)(p)))
    assert grad_at(empirical) < 1e-4 < 1e-3 < grad_at(TRUE), (grad_at(empirical), grad_at(TRUE))
    assert float(mean_loss(empirical)) < float(mean_loss(TRUE))


def _all_signs(batch):
    """The four Rademacher sign vectors of R², each for every example: [4, batch, 2]."""
    signs = jnp.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    return jnp.broadcast_to(signs[:, None, :], (4, batch, D))


@pytest.mark.parametrize("variance_reduced", [False, True])
def test_ssm_expectation_over_probes_is_exact_sm(variance_reduced):
    """Averaged over all four sign vectors, vᵀ(∇s)v = tr ∇s and (vᵀs)² = ||s||² exactly, so SSM = exact SM per
    example up to float32 rounding."""
    x = DATA[:64]
    got = losses.sliced_score_matching_loss(None, _score(PERTURBED), x, variance_reduced=variance_reduced,
                                            probes=_all_signs(64))
    np.testing.assert_allclose(np.asarray(got), _sm_closed_form(PERTURBED, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_ssm_with_random_probes_is_unbiased(probe):
    """One random probe per example: the batch mean of SSM - exact SM is 0 within K_SE standard errors."""
    ssm = losses.sliced_score_matching_loss(jax.random.PRNGKey(7), _score(PERTURBED), DATA, probe=probe)
    diff = np.asarray(ssm, np.float64) - _sm_closed_form(PERTURBED, DATA)
    assert abs(diff.mean()) < K_SE * diff.std() / np.sqrt(N) and diff.std() > 0.1


def test_single_level_dsm_value_at_the_noisy_truth():
    got = np.asarray(losses.denoising_score_matching_loss(jax.random.PRNGKey(2), _score(NOISY_TRUE), DATA,
                                                          SIGMA_DSM), np.float64)
    want = 0.5 * (D / SIGMA_DSM**2 - np.trace(np.linalg.inv(SIGMA + SIGMA_DSM**2 * np.eye(D))))
    assert abs(got.mean() - want) < K_SE * got.std() / np.sqrt(N), (got.mean(), want)


# --- MCMC maximum likelihood. ---

def test_mcmc_mle_gradient_is_the_likelihood_gradient_with_exact_samples():
    """At θ ≠ θ*, with x⁻ exact samples of p_θ, ∇θ of the MCMC-MLE loss equals ∇θ [E_θ(x⁺) + log Z_θ] per pair up to
    the Monte-Carlo error of -∇θE(x⁻) around ∇θ log Z_θ (K_SE standard errors); c's gradient is exactly 0 in both."""
    theta = PERTURBED
    x_neg = _samples(3, N, np.asarray(theta["mu"]), np.linalg.inv(np.asarray(_prec(theta), np.float64)))
    mle = _per_example_gradients(lambda p: losses.mcmc_mle_loss(_energy(p), DATA, x_neg), theta)
    nll = _per_example_gradients(lambda p: gauss_energy(p, DATA) + log_z(p), theta)
    assert np.all(mle[:, -1] == 0.0)
    np.testing.assert_allclose(nll[:, -1], 0.0, atol=1e-6)
    assert _max_z(mle - nll) < K_SE
    assert _max_z(nll) > POWER   # the likelihood gradient itself is far from 0 here


def test_mcmc_mle_energy_regularizer():
    x_pos, x_neg = DATA[:8], DATA[8:16]
    e_pos, e_neg = gauss_energy(TRUE, x_pos), gauss_energy(TRUE, x_neg)
    np.testing.assert_allclose(np.asarray(losses.mcmc_mle_loss(_energy(TRUE), x_pos, x_neg, energy_reg=0.1)),
                               np.asarray(e_pos - e_neg + 0.1 * (e_pos**2 + e_neg**2)), rtol=1e-6)


def test_persistent_cd_buffer_mechanics():
    buffer = losses.ReplayBuffer(samples=jnp.arange(20.0).reshape(10, 2))
    x = DATA[:4]
    init_fn = lambda rng, shape: jnp.full(shape, -100.0)
    # No steps, no restarts: the negatives are 4 distinct buffer rows and the buffer is unchanged.
    loss, new, aux = losses.persistent_cd_loss(jax.random.PRNGKey(0), _energy(TRUE), x, buffer, init_fn, 0, 0.1,
                                               reinit_prob=0.0)
    np.testing.assert_array_equal(np.asarray(new.samples), np.asarray(buffer.samples))
    e_neg = np.asarray(gauss_energy(TRUE, x)) - np.asarray(loss)
    rows = {int(np.argmin(np.abs(np.asarray(gauss_energy(TRUE, buffer.samples)) - e))) for e in e_neg}
    assert len(rows) == 4 and float(aux["reinitialized"]) == 0.0
    # Restart every chain: exactly 4 rows become the init value (after 0 steps), the other 6 are untouched.
    _, new, aux = losses.persistent_cd_loss(jax.random.PRNGKey(1), _energy(TRUE), x, buffer, init_fn, 0, 0.1,
                                            reinit_prob=1.0)
    replaced = np.all(np.asarray(new.samples) == -100.0, axis=1)
    assert replaced.sum() == 4 and float(aux["reinitialized"]) == 1.0
    np.testing.assert_array_equal(np.asarray(new.samples)[~replaced], np.asarray(buffer.samples)[~replaced])
    with pytest.raises(ValueError, match="at least the batch size"):
        losses.persistent_cd_loss(jax.random.PRNGKey(0), _energy(TRUE), DATA[:11], buffer, init_fn, 0, 0.1)


# --- Training recovers the Gaussian: MCMC objectives and NCE's normalizer. ---

def _train(loss_fn, params, n_steps, lr=0.05, state=None):
    """Adam with a cosine-decayed step on the mean of loss_fn(params, rng, state) -> (losses [B], state)."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, n_steps))

    def step(carry, i):
        params, opt_state, state = carry
        grads, state = jax.grad(lambda p: (lambda l, s: (jnp.mean(l), s))(*loss_fn(p, jax.random.PRNGKey(i), state)),
                                has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state, state), None

    (params, _, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(n_steps)))(
        (params, opt.init(params), state))
    return params, state


START = _params(np.zeros(D), 0.5 * np.eye(D), 0.0)
TRAIN_DATA = DATA[:4000]
TRAIN_MEAN, TRAIN_COV = np.asarray(TRAIN_DATA).mean(0), np.cov(np.asarray(TRAIN_DATA), rowvar=False)


def _assert_recovers(params, label, tol=0.05):
    """Learned mean and covariance against the training sample's (the estimators' target), the covariance error
    relative to sqrt(Σ_ii Σ_jj). The tolerance holds the optimisation and sampler errors: measured ≤ 0.012 below."""
    cov = np.linalg.inv(np.asarray(_prec(params), np.float64))
    assert np.max(np.abs(np.asarray(params["mu"]) - TRAIN_MEAN)) < tol, (label, params["mu"], TRAIN_MEAN)
    assert np.max(np.abs(cov - TRAIN_COV) / np.sqrt(np.outer(np.diag(TRAIN_COV), np.diag(TRAIN_COV)))) < tol, \
        (label, cov, TRAIN_COV)


def test_cd_with_mala_recovers_the_gaussian():
    """CD-10 with exact MALA chains from the data, 200 Adam steps: measured errors 0.005 (mean), 0.001 (cov)."""
    cd = lambda p, rng, s: (losses.contrastive_divergence_loss(rng, _energy(p), TRAIN_DATA, 10, 0.8, mala=True)[0], s)
    params, _ = _train(cd, START, n_steps=200)
    _assert_recovers(params, "CD-10 MALA")


def test_persistent_cd_from_a_noise_buffer_recovers_the_gaussian():
    """PCD, buffer of 8000 chains from U[-6, 6]², 1% restarted per step, 5 MALA steps, 300 Adam steps: measured
    errors 0.012 (mean), 0.009 (cov). (With 5% restarts the fresh, unmixed chains bias the covariance by ~5%.)"""
    init_fn = lambda rng, shape: jax.random.uniform(rng, shape, minval=-6.0, maxval=6.0)
    buffer = losses.init_replay_buffer(jax.random.PRNGKey(9), init_fn, 8000, (D,))

    def pcd(p, rng, buffer):
        loss, buffer, _ = losses.persistent_cd_loss(rng, _energy(p), TRAIN_DATA, buffer, init_fn, 5, 0.8,
                                                    reinit_prob=0.01, mala=True)
        return loss, buffer

    params, buffer = _train(pcd, START, n_steps=300, state=buffer)
    _assert_recovers(params, "PCD MALA")
    assert np.isfinite(np.asarray(buffer.samples)).all()


def test_nce_learns_the_normalizer():
    """NCE (ν = 4, noise N(x̄, 2S)) from c = 0, 300 Adam steps: the learned c matches log Z = (D/2) log 2π +
    ½ log det Σ̂ of the learned Gaussian (measured 0.003 apart) and the true log Z (0.005 apart; the sample's
    log det differs from the truth by ~0.016 s.d. at n = 4000)."""
    noise = losses.gaussian_noise(jnp.asarray(TRAIN_MEAN, jnp.float32), jnp.asarray(2.0 * TRAIN_COV, jnp.float32))
    nce = lambda p, rng, s: (losses.nce_loss(rng, _energy(p), TRAIN_DATA, noise, nu=4), s)
    params, _ = _train(nce, START, n_steps=300)
    _assert_recovers(params, "NCE")
    c_fit = 0.5 * D * np.log(2 * np.pi) + 0.5 * np.linalg.slogdet(np.linalg.inv(np.asarray(_prec(params))))[1]
    assert abs(float(params["c"]) - c_fit) < 0.02 and abs(float(params["c"]) - C_TRUE) < 0.05, (params["c"], c_fit)


# --- The registered objectives on an energy network (get_loss_fn). ---

def _ebm_config(objective, model="energy_mlp"):
    config = get_default_configs()
    config.model.name, config.model.nf, config.model.num_layers = model, 8, 1
    config.model.energy_quadratic = 0.1
    config.training.objective = objective
    config.training.ebm = ml_collections.ConfigDict(dict(langevin_steps=3, step_size=0.3, mala=True, n_slices=2,
                                                         sigma=0.2, nce_ratio=2))
    return config


def _network(config, x):
    """The model and parameters of its exact tree filled with N(0, 0.3²) numpy noise (nothing zero-initialized)."""
    model = models.create_model(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros(x.shape[:1]))["params"]
    rng = np.random.default_rng(0)
    return model, jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)


def _direct(objective, config, rng, score_fn, x):
    """The pure function the objective should reduce to, at t = training.eps and get_loss_fn's loss key."""
    e, at_eps = losses.ebm_settings(config), lambda fn: losses.at_time(fn, config.training.eps)
    energy_fn = at_eps(energy.energy_from_score(score_fn))
    return {
        "ebm_cd": lambda: losses.contrastive_divergence_loss(rng, energy_fn, x, 3, 0.3, mala=True)[0],
        "ebm_sm": lambda: losses.exact_score_matching_loss(at_eps(score_fn), x),
        "ebm_ssm": lambda: losses.sliced_score_matching_loss(rng, at_eps(score_fn), x, 2),
        "ebm_ssm_vr": lambda: losses.sliced_score_matching_loss(rng, at_eps(score_fn), x, 2, variance_reduced=True),
        "ebm_dsm": lambda: losses.denoising_score_matching_loss(rng, at_eps(score_fn), x, 0.2),
        "ebm_nce": lambda: losses.nce_loss(rng, energy_fn, x, losses.fit_gaussian_noise(x), nu=2),
    }[objective]()


@pytest.mark.parametrize("objective", ["ebm_cd", "ebm_dsm", "ebm_nce", "ebm_sm", "ebm_ssm", "ebm_ssm_vr"])
def test_registered_objective_is_the_pure_function_on_the_network(objective):
    config, x, rng = _ebm_config(objective), DATA[:16], jax.random.PRNGKey(4)
    sde = sde_lib.get_sde(config)
    model, params = _network(config, x)
    loss_fn = losses.get_loss_fn(config, sde, model, train=False)

    @jax.jit
    def run(params):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, rng)
        score_fn = models.get_score_fn(sde, model, {"params": params})
        return loss, aux, grads, jnp.mean(_direct(objective, config, jax.random.split(rng)[1], score_fn, x))

    loss, aux, grads, direct = run(params)
    np.testing.assert_allclose(float(loss), float(direct), rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # The learnable log-normalizer c: only NCE sees it (the score ignores c; CD's E(x⁺) - E(x⁻) cancels it).
    dc = float(grads["EnergyReadout_0"]["log_normalizer"])
    assert (abs(dc) > 1e-3) if objective == "ebm_nce" else (dc == 0.0)
    if objective == "ebm_cd":
        assert 0.0 < float(aux["acceptance"]) <= 1.0 and set(aux) == {"energy_pos", "energy_neg", "acceptance"}


def test_energy_objectives_need_an_energy_network():
    config = _ebm_config("ebm_cd", model="mlp")
    model, params = _network(config, DATA[:4])
    loss_fn = losses.get_loss_fn(config, sde_lib.get_sde(config), model, train=False)
    with pytest.raises(ValueError, match="energy_mlp or energy_conv"):
        loss_fn(params, DATA[:4], jax.random.PRNGKey(0))


@pytest.mark.parametrize("field, value, message", [("langevin_step", 3, "unknown fields"),
                                                   ("probe", "sphere", "probe must be one of"),
                                                   ("nce_noise", "uniform", "nce_noise must be one of"),
                                                   ("step_size", 0.0, "step_size, sigma > 0"),
                                                   ("chain_init", "gaussian", "chain_init must be one of"),
                                                   ("reinit_prob", 1.5, "reinit_prob must lie in")])
def test_ebm_settings_errors_name_the_field(field, value, message):
    config = _ebm_config("ebm_cd")
    config.training.ebm[field] = value
    with pytest.raises(ValueError, match=message):
        losses.ebm_settings(config)



def test_pcd_objective_carries_its_replay_buffer_in_the_train_state():
    """"ebm_pcd" keeps persistent_cd_loss's buffer in TrainState.objective_state: one train step equals the pure
    function at the step's key, rewrites exactly the batch's B rows of the buffer, and evaluation leaves it alone."""
    config, x = _ebm_config("ebm_pcd"), DATA[:8]
    config.training.ebm.update(buffer_size=32, chain_init="prior", reinit_prob=0.25)
    sde = sde_lib.get_sde(config)
    model = models.create_model(config)
    state = losses.init_train_state(jax.random.PRNGKey(0), config, model, (1, D))
    buffer = state.objective_state.samples
    assert buffer.shape == (32, D)
    # Drawn from the VP prior N(0, I) with key fold_in(init key, 1).
    np.testing.assert_array_equal(np.asarray(buffer), np.asarray(jax.random.normal(
        jax.random.fold_in(jax.random.PRNGKey(0), 1), (32, D))))
    loss_fn = losses.get_loss_fn(config, sde, model)
    step_fn = jax.jit(losses.get_step_fn(loss_fn, losses.get_optimizer(config), 0.9))
    rng = jax.random.PRNGKey(7)
    new_state, metrics = step_fn(state, x, rng)

    key = jax.random.split(jax.random.fold_in(rng, 0))[1]   # get_step_fn's step key, then get_loss_fn's loss key
    score_fn = models.get_score_fn(sde, model, {"params": state.params})
    energy_fn = losses.at_time(energy.energy_from_score(score_fn), config.training.eps)
    init_fn = lambda r, shape: sde.prior_sampling(r, shape)
    direct, direct_buffer, aux = losses.persistent_cd_loss(key, energy_fn, x, state.objective_state, init_fn, 3, 0.3,
                                                           reinit_prob=0.25, mala=True)
    np.testing.assert_allclose(float(metrics["loss"]), float(jnp.mean(direct)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new_state.objective_state.samples), np.asarray(direct_buffer.samples),
                               atol=1e-5)
    changed = np.any(np.asarray(new_state.objective_state.samples) != np.asarray(buffer), axis=1)
    assert changed.sum() == 8 and "next_objective_state" not in metrics
    assert float(metrics["reinitialized"]) == float(aux["reinitialized"])
    eval_metrics = jax.jit(losses.get_eval_fn(losses.get_loss_fn(config, sde, model, train=False)))(new_state, x, rng)
    assert set(eval_metrics) == {"loss", "energy_pos", "energy_neg", "acceptance", "reinitialized"}

