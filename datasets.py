"""Datasets: the Gaussian-mixture oracle (SPEC §9) and embedded low-dimensional toy densities.

`GaussianMixture` is closed under the forward SDEs: if p_0 = Σ_k π_k N(μ_k, Σ_k) then
p_t = Σ_k π_k N(m(t) μ_k, m(t)² Σ_k + σ_t² I). So log p_t, its score and the exact NLL of any point are known
in closed form, and every numerical path of the project can be checked against them without training.
"""
import jax
import jax.numpy as jnp
import numpy as np


class GaussianMixture:
    """p_0 = Σ_k weights[k] N(means[k], covs[k]) on R^D, and its marginals p_t under any SDE of sde_lib."""

    def __init__(self, weights, means, covs):
        self.weights = np.asarray(weights, np.float64)
        self.means = np.asarray(means, np.float64)
        self.covs = np.asarray(covs, np.float64)
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(f"shapes do not match: weights {self.weights.shape}, means {self.means.shape}, "
                             f"covs {self.covs.shape}; expected ({k},), ({k}, {d}), ({k}, {d}, {d})")
        if not np.isclose(self.weights.sum(), 1.0) or (self.weights < 0).any():
            raise ValueError(f"mixture weights must be non-negative and sum to 1, got {self.weights}")
        self.dim = d

    @classmethod
    def isotropic(cls, weights, means, std):
        means = np.asarray(means, np.float64)
        k, d = means.shape
        return cls(weights, means, np.broadcast_to(np.eye(d) * std**2, (k, d, d)).copy())

    def sample(self, rng, n):
        """n samples [n, D] of p_0 (float32)."""
        k_rng, z_rng = jax.random.split(rng)
        comp = jax.random.choice(k_rng, len(self.weights), (n,), p=jnp.asarray(self.weights, jnp.float32))
        chol = jnp.asarray(np.linalg.cholesky(self.covs), jnp.float32)
        z = jax.random.normal(z_rng, (n, self.dim))
        return jnp.asarray(self.means, jnp.float32)[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)

    def _marginal_params(self, sde, t):
        """Per-example component means [B, K, D] and covariances [B, K, D, D] of p_t."""
        m = sde.mean_coef(t)[:, None, None]
        v = sde.marginal_std(t)[:, None, None, None] ** 2
        means = m * jnp.asarray(self.means, t.dtype)[None]
        covs = m[..., None] ** 2 * jnp.asarray(self.covs, t.dtype)[None] + v * jnp.eye(self.dim, dtype=t.dtype)
        return means, covs

    def _component_terms(self, x, t, sde):
        """log π_k + log N(x; μ_k(t), C_k(t)) [B, K] and C_k⁻¹(x - μ_k) [B, K, D]."""
        if sde is None:
            means = jnp.broadcast_to(jnp.asarray(self.means, x.dtype), (x.shape[0],) + self.means.shape)
            covs = jnp.broadcast_to(jnp.asarray(self.covs, x.dtype), (x.shape[0],) + self.covs.shape)
        else:
            means, covs = self._marginal_params(sde, jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1]))
        chol = jnp.linalg.cholesky(covs)
        diff = x[:, None, :] - means
        white = jax.scipy.linalg.solve_triangular(chol, diff[..., None], lower=True)[..., 0]
        prec_diff = jax.scipy.linalg.solve_triangular(chol, white[..., None], lower=True, trans=1)[..., 0]
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        log_comp = -0.5 * (jnp.sum(white**2, -1) + logdet + self.dim * jnp.log(2 * jnp.pi))
        return jnp.log(jnp.asarray(self.weights, x.dtype)) + log_comp, prec_diff

    def log_prob(self, x, t=None, sde=None):
        """log p_t(x) [B]; log p_0(x) when sde is None."""
        log_joint, _ = self._component_terms(x, t, sde)
        return jax.scipy.special.logsumexp(log_joint, axis=1)

    def score(self, x, t, sde):
        """∇_x log p_t(x) [B, D] = -Σ_k r_k(x) C_k⁻¹ (x - μ_k), r the responsibilities."""
        log_joint, prec_diff = self._component_terms(x, t, sde)
        resp = jax.nn.softmax(log_joint, axis=1)
        return -jnp.einsum("bk,bkd->bd", resp, prec_diff)

    def score_fn(self, sde):
        """The exact score of p_t as a score function (x [B, D], t [B]) -> [B, D]."""
        return lambda x, t: self.score(x, t, sde)

    def marginal_moments(self, sde=None, t=None):
        """Mean [D] and covariance [D, D] of p_t (of p_0 when sde is None)."""
        m = 1.0 if sde is None else float(sde.mean_coef(jnp.asarray(t)))
        v = 0.0 if sde is None else float(sde.marginal_std(jnp.asarray(t))) ** 2
        mean = m * self.weights @ self.means
        second = np.einsum("k,kij->ij", self.weights, m**2 * self.covs + v * np.eye(self.dim)
                           + m**2 * np.einsum("ki,kj->kij", self.means, self.means))
        return mean, second - np.outer(mean, mean)

    def entropy(self, rng, n=100_000):
        """Monte-Carlo estimate of H(p_0) = -E log p_0 in nats, with its standard error."""
        lp = np.asarray(self.log_prob(self.sample(rng, n)), np.float64)
        return -lp.mean(), lp.std() / np.sqrt(n)


def exact_prior_logp(mixture, sde):
    """log p_T, the exact terminal marginal, to use in place of sde.prior_logp when the prior mismatch matters."""
    return lambda z: mixture.log_prob(z, jnp.full(z.shape[:1], sde.T), sde)

