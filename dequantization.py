"""Variational dequantization (SPEC §4, last paragraph; seed 001): a conditional flow q(u | k) on (0, 1)^D and
the variational bits/dim it gives, trained against a frozen score model.

Integer data k ∈ {0..K-1}^D is mapped to model space by x = a·(k + u)/K + b (SPEC §4). For any q(u | k),
    -log P(k) ≤ E_q[-log p_model(x(k, u)) + log q(u | k)] - D log|a/K|,
with equality iff q(u | k) ∝ p_model(x(k, u)) on the cell; uniform dequantization is the special case q = 1.
Seed 001 trains q after the score model by minimizing the right side with the cheap DSM form of its bound in
place of -log p_model (score frozen, gradient through x). `-log p_model` is any callable nll(rng, x) -> [B]
nats: the probability-flow ODE (`ode_nll_fn`) or seed 001's bound (`bound_nll_fn`, which makes the whole
number a certified bound on the SDE model).

Every function takes k as integers [B, ...]: [B, D] for flat data, [B, H, W, C] for images.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import likelihood
import sde_lib

_MAX_LOG_SCALE = 3.0  # soft bound on each coupling's log-scale, so early updates cannot blow the flow up


# --- The flow q(u | k): Gaussian ε -> affine couplings conditioned on k -> sigmoid. ---
def _masks(shape, num_couplings):
    """One {0, 1} mask per coupling, broadcastable to `shape` = x.shape[1:]; 1 marks the dimensions a coupling
    keeps (and conditions on), 0 those it transforms.

    Images [H, W, C]: checkerboards of alternating parity, alternating with channel halves when C > 1. Flat [D]:
    alternating halves by index parity; for D = 1 every coupling transforms the one dimension, conditioned on k
    only (a parity mask would leave half of the couplings the identity).
    """
    masks = []
    for i in range(num_couplings):
        if len(shape) == 3:
            h, w, c = shape
            if c > 1 and i % 4 >= 2:
                mask = (np.arange(c) < c // 2)[None, None, :] ^ bool(i % 2)
            else:
                mask = ((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == i % 2)[:, :, None]
        elif len(shape) == 1:
            mask = np.zeros(shape, bool) if shape[0] == 1 else np.arange(shape[0]) % 2 == i % 2
        else:
            raise ValueError(f"data must be flat [B, D] or images [B, H, W, C], got example shape {shape}")
        masks.append(jnp.asarray(mask, jnp.float32))
    return masks


class _Net(nn.Module):
    """Two hidden layers of `features` (3x3 convolutions for images, dense for flat data) then `out` channels."""

    features: int
    out: int
    zero_last: bool

    @nn.compact
    def __call__(self, h):
        image = h.ndim == 4
        layer = (lambda f, **kw: nn.Conv(f, (3, 3), **kw)) if image else (lambda f, **kw: nn.Dense(f, **kw))
        for _ in range(2):
            h = nn.swish(layer(self.features)(h))
        last_init = nn.initializers.zeros if self.zero_last else nn.initializers.lecun_normal()
        return layer(self.out, kernel_init=last_init)(h)


class _ScaleShift(nn.Module):
    """(s, t), each shaped like `kept`, from the kept dimensions and the context features; s soft-bounded."""

    features: int

    @nn.compact
    def __call__(self, kept, context_features):
        out = _Net(self.features, 2 * kept.shape[-1], zero_last=True)(jnp.concatenate([kept, context_features], -1))
        s, t = jnp.split(out, 2, axis=-1)
        return _MAX_LOG_SCALE * jnp.tanh(s / _MAX_LOG_SCALE), t


class Dequantizer(nn.Module):
    """q(u | k) on (0, 1)^D (SPEC §4, seed 001): u = sigmoid(f_k(ε)) with ε ~ N(0, I) (`noise`) and f_k a stack
    of affine couplings y ← m y + (1 - m)(y e^s + t), (s, t) = net(m y, context features of k).

    `__call__(noise, context)` -> (u, log q(u | k) [B]); `log_prob(u, context)` -> log q(u | k) [B] by the exact
    inverse. log q = log N(ε; 0, I) - Σ s - Σ log σ'(y): the base density minus the log-determinants of the
    couplings and of the sigmoid. The last layer of every coupling net starts at zero, so a fresh flow is the
    identity and u = sigmoid(ε) (logit-normal) whatever k. `context` is k scaled to (-½, ½) (see `dequantize`).
    """

    num_couplings: int = 4
    features: int = 32

    def setup(self):
        self.context_net = _Net(self.features, self.features, zero_last=False)
        self.couplings = [_ScaleShift(self.features) for _ in range(self.num_couplings)]

    def __call__(self, noise, context):
        feats, y, log_det = self.context_net(context), noise, 0.0
        for i, m in enumerate(_masks(noise.shape[1:], self.num_couplings)):
            s, t = self.couplings[i](m * y, feats)
            y = m * y + (1 - m) * (y * jnp.exp(s) + t)
            log_det = log_det + _sum((1 - m) * s)
        log_det = log_det + _sum(jax.nn.log_sigmoid(y) + jax.nn.log_sigmoid(-y))
        return jax.nn.sigmoid(y), sde_lib.gaussian_logp(noise, 1.0) - log_det

    def log_prob(self, u, context):
        feats, y = self.context_net(context), jnp.log(u) - jnp.log1p(-u)
        log_det = _sum(jax.nn.log_sigmoid(y) + jax.nn.log_sigmoid(-y))
        for i, m in reversed(list(enumerate(_masks(u.shape[1:], self.num_couplings)))):
            s, t = self.couplings[i](m * y, feats)
            y = m * y + (1 - m) * (y - t) * jnp.exp(-s)
            log_det = log_det + _sum((1 - m) * s)
        return sde_lib.gaussian_logp(y, 1.0) - log_det


def _sum(x):
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _context(k, levels):
    """The integers as the flow's conditioning input: bin centres (k + ½)/K - ½ ∈ (-½, ½)."""
    return (jnp.asarray(k, jnp.float32) + 0.5) / levels - 0.5


def init_params(rng, model, data_shape):
    """Parameters of `model` (a Dequantizer) for examples of shape data_shape = k.shape[1:]."""
    x = jnp.zeros((1,) + tuple(data_shape), jnp.float32)
    return jax.jit(model.init)(rng, x, x)["params"]


def sample(rng, model, params, k, levels=256):
    """u ~ q(u | k) in (0, 1)^D [B, ...] with its exact log q(u | k) [B] (nats)."""
    noise = jax.random.normal(rng, jnp.shape(k), jnp.float32)
    return model.apply({"params": params}, noise, _context(k, levels))


def log_prob(model, params, u, k, levels=256):
    """log q(u | k) [B] of given u ∈ (0, 1)^D, by the flow's exact inverse."""
    return model.apply({"params": params}, u, _context(k, levels), method=Dequantizer.log_prob)


def dequantize(rng, model, params, k, data_range=(-1.0, 1.0), levels=256):
    """(x, log q(u | k)): x = a (k + u)/K + b in model space (SPEC §4) with u ~ q(u | k), the variational
    counterpart of likelihood.uniform_dequantize."""
    a, b = likelihood._check_data_range(data_range, levels)
    u, log_q = sample(rng, model, params, k, levels)
    return a * (jnp.asarray(k, jnp.float32) + u) / levels + b, log_q


def quantize(x, data_range=(-1.0, 1.0), levels=256):
    """The integers k [B, ...] (int32) of model-space data x = a (k + u)/K + b: exact for bin centres (u = ½, the
    image datasets without uniform dequantization); for u within float32 round-off of a bin edge the neighbour's k
    may come back. Clipped to {0..K-1}."""
    a, b = likelihood._check_data_range(data_range, levels)
    k = jnp.floor((jnp.asarray(x, jnp.float32) - b) * levels / a)
    return jnp.clip(k, 0, levels - 1).astype(jnp.int32)


# --- The variational bits/dim (SPEC §4). ---
def variational_bits_per_dim(rng, model, params, k, nll_fn, data_range=(-1.0, 1.0), levels=256):
    """bpd [B] = (-log p_model(x) + log q(u | k) - D log|a/K|) / (D ln 2), one draw u ~ q(u | k) per example.

    Its expectation over u bounds the discrete model's -log₂ P(k) / D (SPEC §4); average over repeats (or tile k)
    for the paper's number. `nll_fn(rng, x) -> [B]` is -log p_model in nats: `ode_nll_fn` (the probability-flow
    ODE, an estimate) or `bound_nll_fn` (seed 001's bound; then the result is a certified bound on the SDE
    model's bits/dim). Differentiable in params when nll_fn is (the training objective, `get_step_fn`).
    """
    deq_rng, nll_rng = jax.random.split(rng)
    x, log_q = dequantize(deq_rng, model, params, k, data_range, levels)
    return likelihood.bits_per_dim(-(nll_fn(nll_rng, x) + log_q), jnp.shape(k)[1:], data_range, levels)


def ode_nll_fn(sde, score_fn, **options):
    """nll(rng, x) = -log p_eps(x) [B] from the probability-flow ODE (likelihood.log_likelihood and its options)."""
    return lambda rng, x: -likelihood.log_likelihood(rng, sde, score_fn, x, **options)[0]


def bound_nll_fn(sde, score_fn, **options):
    """nll(rng, x) = seed 001's bound on -log p^SDE(x) [B] (likelihood.likelihood_bound and its options: n_t,
    importance_sampling, eps, form, prior_logp)."""
    return lambda rng, x: likelihood.likelihood_bound(rng, sde, score_fn, x, **options)[0]


# --- Fitting q to a frozen score model (seed 001). ---
@flax.struct.dataclass
class DequantizerState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any


def init_state(rng, model, data_shape, optimizer):
    """Step 0: a fresh (identity) flow for examples of data_shape and the optimizer's state."""
    params = init_params(rng, model, data_shape)
    return DequantizerState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def get_step_fn(model, optimizer, sde, data_range=(-1.0, 1.0), levels=256, n_t=4, eps=1e-5,
                importance_sampling=True, prior_logp=None):
    """step_fn(state, k, rng, score_fn) -> (state, {"bpd", "grad_norm"}), pure (the caller jits it).

    One optax update of the dequantizer on the batch of integers k, minimizing the mean variational bpd with
    seed 001's DSM-form bound (n_t times per example, t importance-sampled by default) as -log p_model: the
    gradient flows through x(k, u) into the bound and through log q; the score model is frozen (score_fn is an
    argument, not differentiated; pass models.get_score_fn's Partial so new score parameters do not recompile).
    The key of step i is fold_in(rng, i), as in losses.get_step_fn. "bpd" is the batch's mean variational bound
    before the update (a noisy one: n_t times per example); the ODE bits/dim of the same q is usually lower.
    """
    if int(n_t) < 2:
        raise ValueError(f"n_t (t samples per example of the bound) must be >= 2, got {n_t}")

    def loss_fn(params, k, rng, score_fn):
        nll = bound_nll_fn(sde, score_fn, n_t=n_t, eps=eps, importance_sampling=importance_sampling,
                           form="dsm", prior_logp=prior_logp)
        return jnp.mean(variational_bits_per_dim(rng, model, params, k, nll, data_range, levels))

    def step_fn(state, k, rng, score_fn):
        key = jax.random.fold_in(rng, state.step)
        bpd, grads = jax.value_and_grad(loss_fn)(state.params, k, key, sde_lib.as_pytree(score_fn))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        state = DequantizerState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                 opt_state=opt_state)
        return state, {"bpd": bpd, "grad_norm": optax.global_norm(grads)}

    return step_fn


def fit(rng, model, sde, score_fn, batch_fn, num_steps, data_range=(-1.0, 1.0), levels=256, learning_rate=1e-3,
        **step_options):
    """Train a fresh dequantizer for num_steps Adam steps on batches k = batch_fn(step) (integers [B, ...]).

    Returns (state, bpd per step [num_steps] as numpy). step_options go to `get_step_fn` (n_t, eps,
    importance_sampling, prior_logp). A loop for small runs and tests; a trainer can jit `get_step_fn` itself.
    """
    init_rng, step_rng = jax.random.split(rng)
    optimizer = optax.adam(learning_rate)
    first = jnp.asarray(batch_fn(0))
    state = init_state(init_rng, model, first.shape[1:], optimizer)
    step_fn = jax.jit(get_step_fn(model, optimizer, sde, data_range, levels, **step_options))
    score_fn, history = sde_lib.as_pytree(score_fn), []
    for i in range(int(num_steps)):
        state, metrics = step_fn(state, first if i == 0 else jnp.asarray(batch_fn(i)), step_rng, score_fn)
        history.append(metrics["bpd"])
    return state, np.asarray(jax.device_get(history), np.float64)
