"""Forward SDEs dx = a(t) x dt + g(t) dw (SPEC §1), their reverses (SPEC §2) and time samplers (SPEC §3).

Every SDE here has an affine drift, so all SDE-specific math is a handful of scalar schedules of t:
`drift_coef` a(t), `diffusion_sq` g(t)², `mean_coef` m(t) and `marginal_std` σ_t, with
p_0t(x_t | x_0) = N(m(t) x_0, σ_t² I). Everything else (losses, samplers, likelihoods, the Fokker-Planck
residual) is written once in terms of these, so no module needs to branch on the SDE type.

VE convention (one choice, used everywhere): σ_t = σ_min (σ_max/σ_min)^t, as in the score-SDE code. The
forward SDE then maps p_0 * N(0, σ_min²) at t = 0 to p_0 * N(0, σ_t²); the marginals p_t = p_0 * N(0, σ_t² I)
satisfy the Fokker-Planck equation of the SDE exactly, which is all that samplers and likelihoods use.

Shapes: x is [B, ...], t is [B] (scalars broadcast); per-example outputs are [B].
"""
import abc

import jax
import jax.numpy as jnp
import numpy as np


def batch_mul(c, x):
    """Multiplies per-example scalars c [B] (or a scalar) into x [B, ...]."""
    c = jnp.asarray(c)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) * x


class SDE(abc.ABC):
    """An SDE with drift a(t) x and scalar diffusion g(t) on t ∈ [0, T]."""

    T = 1.0
    name = "sde"

    def __init__(self, N):
        if int(N) < 2:
            raise ValueError(f"N (number of discretization steps) must be >= 2, got {N}")
        self.N = int(N)

    # --- The SDE-specific schedules (SPEC §1 table). ---
    @abc.abstractmethod
    def drift_coef(self, t):
        """a(t) in f(x, t) = a(t) x."""

    @abc.abstractmethod
    def diffusion_sq(self, t):
        """g(t)²."""

    @abc.abstractmethod
    def mean_coef(self, t):
        """m(t): E[x_t | x_0] = m(t) x_0."""

    @abc.abstractmethod
    def marginal_std(self, t):
        """σ_t: the std of p_0t(x_t | x_0)."""

    @property
    @abc.abstractmethod
    def prior_std(self):
        """The std of the prior π = N(0, prior_std² I)."""

    @abc.abstractmethod
    def _lw_antiderivative(self, t):
        """F(t) with F'(t) = g(t)²/σ_t², the unnormalized CDF of the importance sampler (SPEC §3)."""

    @abc.abstractmethod
    def _lw_antiderivative_inverse(self, F):
        """t = F⁻¹(F)."""

    # --- The public API of ARCHITECTURE.md. ---
    def sde(self, x, t):
        """Returns (drift f(x, t) [B, ...], diffusion g(t) [B])."""
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        return batch_mul(self.drift_coef(t), x), jnp.sqrt(self.diffusion_sq(t))

    def marginal_prob(self, x, t):
        """Returns (mean m(t) x [B, ...], std σ_t [B]) of p_0t(x_t | x_0 = x)."""
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        return batch_mul(self.mean_coef(t), x), self.marginal_std(t)

    def prior_sampling(self, rng, shape):
        return self.prior_std * jax.random.normal(rng, shape)

    def prior_logp(self, z):
        """log N(z; 0, prior_std² I) per example [B]."""
        return gaussian_logp(z, self.prior_std)

    def discretize(self, x, t):
        """One reverse-diffusion step's (f, G): x_{i+1} = x_i + f + G z. Euler-Maruyama unless overridden."""
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * np.sqrt(dt)

    def reverse(self, score_fn, probability_flow=False):
        """The reverse-time SDE (or, with probability_flow, the probability-flow ODE) of SPEC §2."""
        return ReverseSDE(self, score_fn, probability_flow)

    # --- Discrete noise levels (SMLD / DDPM) for the discrete-time models and ancestral samplers. ---
    def discrete_marginal(self, x, i):
        """(mean, std) of the discrete forward process at integer level i [B]."""
        raise NotImplementedError(f"{type(self).__name__} has no discrete-time (SMLD/DDPM) formulation")

    def ancestral_step(self, x, t, score):
        """(mean, std) of the ancestral sampling step x_{i-1} | x_i (DDPM / SMLD)."""
        raise NotImplementedError(f"{type(self).__name__} has no ancestral sampler")

    def langevin_alpha(self, t):
        """α of the Langevin corrector's step 2 α (r ||z|| / ||s||)² (SPEC §7): 1 unless the SDE has DDPM's α_i."""
        return jnp.ones_like(t)

    def level_index(self, t):
        """The discrete level i ∈ {0..N-1} of time t (nearest grid point t_i = i T / (N-1))."""
        return jnp.clip(jnp.round(t * (self.N - 1) / self.T), 0, self.N - 1).astype(jnp.int32)

    def level_time(self, i):
        return jnp.asarray(i, jnp.float32) * self.T / (self.N - 1)

    # --- How a network is conditioned and how its output becomes a score (score-SDE conventions). ---
    def noise_labels(self, t, continuous=True):
        """What a noise-conditional network is given for time t [B]."""
        return t * 999 if continuous else self.level_index(t)

    def output_to_score(self, output, t, continuous=True):
        """The network predicts -σ_t · score (VP family); VE networks predict the score directly."""
        if continuous:
            std = self.marginal_std(t)
        else:
            std = self.discrete_marginal(jnp.zeros_like(t), self.level_index(t))[1]
        return batch_mul(-1.0 / std, output)

    # --- Time samplers (SPEC §3). ---
    def sample_time(self, rng, batch_size, eps, importance=False):
        """t ∈ [eps, T]: uniform, or with importance density q(t) ∝ g²/σ² (the likelihood weighting)."""
        check_eps(eps, self.T)
        u = jax.random.uniform(rng, (batch_size,), minval=0.0, maxval=1.0)
        if not importance:
            return eps + u * (self.T - eps)
        return self.importance_icdf(u, eps)

    def likelihood_importance_cum_weight(self, t, eps):
        """Z(t) = ∫_eps^t g(s)²/σ_s² ds; Z(T) normalizes the importance density."""
        return self._lw_antiderivative(t) - self._lw_antiderivative(jnp.asarray(eps, jnp.float32))

    def importance_density(self, t, eps):
        """q(t) = g(t)²/σ_t² / Z(T) on [eps, T]."""
        return self.diffusion_sq(t) / self.marginal_std(t) ** 2 / self.likelihood_importance_cum_weight(self.T, eps)

    def importance_icdf(self, u, eps):
        """Inverse CDF of q: the t with ∫_eps^t q = u, u ∈ [0, 1]."""
        f_eps = self._lw_antiderivative(jnp.asarray(eps, jnp.float32))
        z = self._lw_antiderivative(jnp.asarray(self.T, jnp.float32)) - f_eps
        t = self._lw_antiderivative_inverse(f_eps + u * z)
        return jnp.clip(t, eps, self.T)


class ReverseSDE:
    """dx = [f - c g² s] dt + g dw̄ with c = 1 (reverse SDE) or ½ and no noise (probability-flow ODE)."""

    def __init__(self, forward, score_fn, probability_flow):
        self.forward, self.score_fn, self.probability_flow = forward, score_fn, probability_flow
        self.T, self.N = forward.T, forward.N

    def _combine(self, f, G, x, t):
        c = 0.5 if self.probability_flow else 1.0
        f = f - batch_mul(c * G**2, self.score_fn(x, t))
        return f, jnp.zeros_like(G) if self.probability_flow else G

    def sde(self, x, t):
        return self._combine(*self.forward.sde(x, t), x, t)

    def discretize(self, x, t):
        return self._combine(*self.forward.discretize(x, t), x, t)


class VPSDE(SDE):
    """Variance preserving: dx = -½ β(t) x dt + sqrt(β(t)) dw, β linear in t (DDPM's continuous limit)."""

    name = "vpsde"

    def __init__(self, beta_min=0.1, beta_max=20.0, N=1000):
        super().__init__(N)
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        if beta_max / N >= 1.0:
            raise ValueError(f"N={N} steps make DDPM's largest β_i = beta_max/N = {beta_max / N:.3g} >= 1; "
                             f"use N > beta_max (e.g. model.num_scales >= {int(beta_max) + 1})")
        self.beta_0, self.beta_1 = float(beta_min), float(beta_max)
        # DDPM's discretization (SPEC §1): β_i = β_min/N + i/(N-1) (β_max - β_min)/N.
        self.discrete_betas = np.linspace(beta_min / N, beta_max / N, N)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)

    def beta(self, t):
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def integrated_beta(self, t):
        """B(t) = ∫_0^t β."""
        return self.beta_0 * t + 0.5 * t**2 * (self.beta_1 - self.beta_0)

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def diffusion_sq(self, t):
        return self.beta(t)

    def mean_coef(self, t):
        return jnp.exp(-0.5 * self.integrated_beta(t))

    def marginal_std(self, t):
        return jnp.sqrt(-jnp.expm1(-self.integrated_beta(t)))

    @property
    def prior_std(self):
        return 1.0

    def _integrated_beta_inverse(self, b):
        """The t ≥ 0 with B(t) = b (a quadratic)."""
        db = self.beta_1 - self.beta_0
        return 2.0 * b / (self.beta_0 + jnp.sqrt(self.beta_0**2 + 2.0 * db * b))

    # g²/σ² = β / (1 - e^{-B}) = d/dt log(e^B - 1).
    def _lw_antiderivative(self, t):
        return jnp.log(jnp.expm1(self.integrated_beta(t)))

    def _lw_antiderivative_inverse(self, F):
        return self._integrated_beta_inverse(jnp.logaddexp(F, 0.0))

    def discrete_marginal(self, x, i):
        return batch_mul(jnp.asarray(self.sqrt_alphas_cumprod, x.dtype)[i], x), jnp.asarray(
            self.sqrt_1m_alphas_cumprod, x.dtype)[i]

    def discretize(self, x, t):
        """DDPM's discretization: f = (sqrt(α_i) - 1) x, G = sqrt(β_i)."""
        i = self.level_index(t)
        beta = jnp.asarray(self.discrete_betas, x.dtype)[i]
        alpha = jnp.asarray(self.alphas, x.dtype)[i]
        return batch_mul(jnp.sqrt(alpha), x) - x, jnp.sqrt(beta)

    def langevin_alpha(self, t):
        """α_i = 1 - β_i of t's discrete level (the score-SDE convention for VP and sub-VP)."""
        return jnp.asarray(self.alphas, t.dtype)[self.level_index(t)]

    def ancestral_step(self, x, t, score):
        """DDPM ancestral sampling: mean (x + β_i s) / sqrt(α_i), std sqrt(β_i)."""
        i = self.level_index(t)
        beta = jnp.asarray(self.discrete_betas, x.dtype)[i]
        mean = batch_mul(1.0 / jnp.sqrt(1.0 - beta), x + batch_mul(beta, score))
        return mean, jnp.sqrt(beta)


class subVPSDE(VPSDE):
    """sub-VP: the VP drift with g² = β(t)(1 - e^{-2B(t)}); std 1 - e^{-B(t)} ≤ the VP std."""

    name = "subvpsde"

    def diffusion_sq(self, t):
        return self.beta(t) * -jnp.expm1(-2.0 * self.integrated_beta(t))

    def marginal_std(self, t):
        return -jnp.expm1(-self.integrated_beta(t))

    # g²/σ² = β (e^B + 1)/(e^B - 1) = β coth(B/2) = d/dt 2 log sinh(B/2).
    def _lw_antiderivative(self, t):
        half_b = 0.5 * self.integrated_beta(t)
        # log sinh(y) = y + log(1 - e^{-2y}) - log 2, stable for small and large y.
        return 2.0 * (half_b + jnp.log(-jnp.expm1(-2.0 * half_b)) - np.log(2.0))

    def _lw_antiderivative_inverse(self, F):
        return self._integrated_beta_inverse(2.0 * jnp.arcsinh(jnp.exp(0.5 * F)))

    def discrete_marginal(self, x, i):
        raise NotImplementedError("sub-VP SDE has no discrete-time formulation; use continuous=True")

    def discretize(self, x, t):
        return SDE.discretize(self, x, t)

    def ancestral_step(self, x, t, score):
        raise NotImplementedError("sub-VP SDE has no ancestral sampler; use reverse_diffusion or euler_maruyama")


class VESDE(SDE):
    """Variance exploding: dx = sqrt(d σ²(t)/dt) dw with σ(t) = σ_min (σ_max/σ_min)^t (SMLD's continuous limit)."""

    name = "vesde"

    def __init__(self, sigma_min=0.01, sigma_max=50.0, N=1000):
        super().__init__(N)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.log_ratio = float(np.log(sigma_max / sigma_min))
        # SMLD's geometric levels, increasing with the level index i (time t_i = i/(N-1)).
        self.discrete_sigmas = np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), N))

    def drift_coef(self, t):
        return jnp.zeros_like(t)

    def diffusion_sq(self, t):
        return 2.0 * self.log_ratio * self.marginal_std(t) ** 2

    def mean_coef(self, t):
        return jnp.ones_like(t)

    def marginal_std(self, t):
        return self.sigma_min * jnp.exp(t * self.log_ratio)

    @property
    def prior_std(self):
        return self.sigma_max

    # g²/σ² = 2 log(σ_max/σ_min) is constant: the importance sampler is uniform.
    def _lw_antiderivative(self, t):
        return 2.0 * self.log_ratio * t

    def _lw_antiderivative_inverse(self, F):
        return F / (2.0 * self.log_ratio)

    def discrete_marginal(self, x, i):
        return x, jnp.asarray(self.discrete_sigmas, x.dtype)[i]

    def _adjacent_sigma(self, i, dtype):
        sigmas = jnp.asarray(self.discrete_sigmas, dtype)
        return sigmas[i], jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])

    def discretize(self, x, t):
        """SMLD's discretization: f = 0, G = sqrt(σ_i² - σ_{i-1}²)."""
        sigma, adjacent = self._adjacent_sigma(self.level_index(t), x.dtype)
        return jnp.zeros_like(x), jnp.sqrt(sigma**2 - adjacent**2)

    def ancestral_step(self, x, t, score):
        """SMLD ancestral sampling (score-SDE paper, eq. 47)."""
        sigma, adjacent = self._adjacent_sigma(self.level_index(t), x.dtype)
        mean = x + batch_mul(sigma**2 - adjacent**2, score)
        std = jnp.sqrt(adjacent**2 * (sigma**2 - adjacent**2) / sigma**2)
        return mean, std

    def noise_labels(self, t, continuous=True):
        """VE networks condition on σ_t (continuous) or on the NCSN level index, 0 = σ_max (discrete)."""
        if continuous:
            return self.marginal_std(t)
        return (self.N - 1) - self.level_index(t)

    def output_to_score(self, output, t, continuous=True):
        return output


def gaussian_logp(z, std):
    """log N(z; 0, std² I) summed over all but the batch axis (SPEC §1)."""
    d = np.prod(z.shape[1:])
    sq = jnp.sum(z.reshape(z.shape[0], -1) ** 2, axis=1)
    return -0.5 * d * jnp.log(2 * np.pi * std**2) - sq / (2 * std**2)


def as_pytree(score_fn):
    """A score function as a jit argument: a jax.tree_util.Partial's bound arrays are traced, its function static.

    models.get_score_fn returns such a Partial, so a network's new parameters reuse compiled samplers and solvers;
    any other callable is wrapped and compiles once per callable object.
    """
    return score_fn if isinstance(score_fn, jax.tree_util.Partial) else jax.tree_util.Partial(score_fn)


def _uniform_noise(rng, sde, shape):
    del sde
    return jax.random.uniform(rng, shape)


def _prior_noise(rng, sde, shape):
    return sde.prior_sampling(rng, shape)


# Where chains start that do not start from data: NCSN's uniform noise on [0, 1]^D, or the SDE's prior.
INITIAL_NOISE = {"prior": _prior_noise, "uniform": _uniform_noise}


def initial_noise(name, rng, sde, shape):
    """A draw of INITIAL_NOISE[name] of `shape` (ValueError naming the choices for an unknown name)."""
    if name not in INITIAL_NOISE:
        raise ValueError(f"unknown initial noise {name!r}; choose one of {sorted(INITIAL_NOISE)}")
    return INITIAL_NOISE[name](rng, sde, shape)


def check_eps(eps, T=1.0):
    if not 0.0 < float(eps) < T:
        raise ValueError(f"eps must lie in (0, T) = (0, {T}), got {eps}")


_SDES = {"vesde": VESDE, "vpsde": VPSDE, "subvpsde": subVPSDE}


def get_sde(config):
    """The SDE named by config.training.sde with the config's model noise schedule."""
    name, m = config.training.sde.lower(), config.model
    if name not in _SDES:
        raise ValueError(f"unknown SDE {config.training.sde!r}; choose one of {sorted(_SDES)}")
    if name == "vesde":
        return VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales)
    return _SDES[name](beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
