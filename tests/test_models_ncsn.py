"""NCSN v1 and NCSNv2 RefineNets: parameter trees and counts, conditioning, and the instance norm++ formula.

Parameter counts of the full-size networks come from jax.eval_shape (shapes only, nothing is computed) and are
compared with an independent count written from the reference constructors' layer lists (ermongroup/ncsn
CondRefineNetDilated; score-SDE JAX models/ncsnv2.py), not from the model code. No published counts were found
(neither paper nor repository states one), so the literals below are this count, kept as regression anchors.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sde_lib
from models import get_model, ncsn, ncsnv2  # noqa: F401  (registers "ncsn", "ncsnv2_64/128/256")
from models.normalization import ConditionalInstanceNorm2dPlus, InstanceNorm2dPlus
from models.layers import get_sigmas
from models.refinenet_layers import resize_bilinear_align_corners


def make_config(name, nf, image_size, channels=3, num_scales=10, sigma_max=1.0, scale_by_sigma=None,
                interpolation="bilinear"):
    """The score-SDE config fields the RefineNets read (ml_collections, frozen as models.create_model does)."""
    config = ml_collections.ConfigDict()
    config.model = model = ml_collections.ConfigDict()
    model.name = name
    model.nf = nf
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.interpolation = interpolation
    model.scale_by_sigma = name != "ncsn" if scale_by_sigma is None else scale_by_sigma
    model.sigma_min = 0.01
    model.sigma_max = sigma_max
    model.num_scales = num_scales
    config.data = data = ml_collections.ConfigDict()
    data.image_size = image_size
    data.num_channels = channels
    data.centered = False
    return ml_collections.FrozenConfigDict(config)


# The reference configurations: ermongroup/ncsn anneal.yml (NCSN: ngf 128 CIFAR-10 / 64 MNIST, L = 10, σ 1 → 0.01),
# score-SDE configs/ncsnv2/cifar10.py (nf 128, 232 levels, σ_max 50) and bedroom.py (128 px, nf 128,
# σ_max 190, 1086 levels); 256 px: ermongroup/ncsnv2 configs/ffhq.yml (ngf 128, σ 348 → 0.01, 2311 levels).
REFERENCE_CONFIGS = {
    "ncsn_cifar10": make_config("ncsn", 128, 32, num_scales=10, sigma_max=1.0),
    "ncsn_mnist": make_config("ncsn", 64, 28, channels=1, num_scales=10, sigma_max=1.0),
    "ncsnv2_cifar10": make_config("ncsnv2_64", 128, 32, num_scales=232, sigma_max=50.0),
    "ncsnv2_128_bedroom": make_config("ncsnv2_128", 128, 128, num_scales=1086, sigma_max=190.0),
    "ncsnv2_256": make_config("ncsnv2_256", 128, 256, num_scales=2311, sigma_max=348.0),
}
EXPECTED_COUNTS = {
    "ncsn_cifar10": 30_117_635,
    "ncsn_mnist": 7_638_657,
    "ncsnv2_cifar10": 33_970_563,
    "ncsnv2_128_bedroom": 83_445_379,
    "ncsnv2_256": 94_132_611,
}


# --- An independent parameter count, from the layer lists of the reference constructors. ---

def conv_count(k, c_in, c_out, bias=True):
    return k * k * c_in * c_out + (c_out if bias else 0)


def norm_count(c, levels):
    """Instance norm++: α, γ, β per channel; the conditional one holds them per noise level."""
    return 3 * c * (levels or 1)


def residual_block_count(c_in, c_out, resample, dilation, levels):
    n = norm_count(c_in, levels)
    if resample == "down":
        n += conv_count(3, c_in, c_in) + norm_count(c_in, levels) + conv_count(3, c_in, c_out)
        return n + conv_count(3 if dilation > 1 else 1, c_in, c_out)    # dilated conv or ConvMeanPool shortcut
    n += conv_count(3, c_in, c_out) + norm_count(c_out, levels) + conv_count(3, c_out, c_out)
    return n + (conv_count(3 if dilation > 1 else 1, c_in, c_out) if c_in != c_out else 0)


def rcu_count(c, n_blocks, levels):
    """n_blocks × 2 stages of a bias-free 3x3 conv (preceded by a conditional norm in NCSN v1)."""
    return n_blocks * 2 * (conv_count(3, c, c, bias=False) + (norm_count(c, levels) if levels else 0))


def refine_block_count(in_planes, features, end, levels):
    norm = (lambda c: norm_count(c, levels)) if levels else (lambda c: 0)
    n = sum(rcu_count(c, 2, levels) for c in in_planes)
    if len(in_planes) > 1:
        n += sum(norm(c) + conv_count(3, c, features) for c in in_planes)        # MSF
    n += 2 * (norm(features) + conv_count(3, features, features, bias=False))    # CRP
    return n + rcu_count(features, 3 if end else 1, levels)


def network_count(channels, nf, residual_blocks, refine_blocks, levels=0):
    """begin conv + ResNet + RefineNet + final norm + end conv. Blocks as (c_in, c_out, resample, dilation) and
    (in_planes, features, end), in multiples of nf."""
    n = conv_count(3, channels, nf) + norm_count(nf, levels) + conv_count(3, nf, channels)
    n += sum(residual_block_count(a * nf, b * nf, r, d, levels) for a, b, r, d in residual_blocks)
    return n + sum(refine_block_count([p * nf for p in planes], f * nf, end, levels)
                   for planes, f, end in refine_blocks)


NCSN_RESNET = [(1, 1, None, 1), (1, 1, None, 1), (1, 2, "down", 1), (2, 2, None, 1),
               (2, 2, "down", 2), (2, 2, None, 2), (2, 2, "down", 4), (2, 2, None, 4)]
DEEPER_RESNET = [(1, 1, None, 1), (1, 1, None, 1), (1, 2, "down", 1), (2, 2, None, 1),
                 (2, 2, "down", 1), (2, 2, None, 1), (2, 4, "down", 2), (4, 4, None, 2),
                 (4, 4, "down", 4), (4, 4, None, 4)]
DEEPEST_RESNET = DEEPER_RESNET[:6] + [(2, 2, "down", 1), (2, 2, None, 1)] + DEEPER_RESNET[6:]
# RefineBlocks as ([input widths], width, end); NCSN v1's third block is nf wide, score-SDE NCSNv2's 2 nf.
NCSN_REFINE = [([2], 2, False), ([2, 2], 2, False), ([2, 2], 1, False), ([1, 1], 1, True)]
NCSNV2_REFINE = [([2], 2, False), ([2, 2], 2, False), ([2, 2], 2, False), ([1, 2], 1, True)]
DEEPER_REFINE = [([4], 4, False), ([4, 4], 2, False), ([2, 2], 2, False), ([2, 2], 1, False), ([1, 1], 1, True)]
DEEPEST_REFINE = DEEPER_REFINE[:3] + [([2, 2], 2, False)] + DEEPER_REFINE[3:]

INDEPENDENT_COUNTS = {
    "ncsn_cifar10": network_count(3, 128, NCSN_RESNET, NCSN_REFINE, levels=10),
    "ncsn_mnist": network_count(1, 64, NCSN_RESNET, NCSN_REFINE, levels=10),
    "ncsnv2_cifar10": network_count(3, 128, NCSN_RESNET, NCSNV2_REFINE),
    "ncsnv2_128_bedroom": network_count(3, 128, DEEPER_RESNET, DEEPER_REFINE),
    "ncsnv2_256": network_count(3, 128, DEEPEST_RESNET, DEEPEST_REFINE),
}


def param_shapes(config, batch=1):
    model = get_model(config.model.name)(config=config)
    size, channels = config.data.image_size, config.data.num_channels
    x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, labels)["params"]


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("key", REFERENCE_CONFIGS)
def test_parameter_count_matches_the_layer_by_layer_count(key):
    """Exact integers: a missing bias, norm or conv, or a wrong width, changes the count."""
    n = count(param_shapes(REFERENCE_CONFIGS[key]))
    assert n == INDEPENDENT_COUNTS[key] == EXPECTED_COUNTS[key]


def test_ncsnv2_tree_has_the_score_sde_names_and_shapes():
    """Auto-names in score-SDE's call order (Conv_0 = begin conv, ConvMeanPool_1 = shortcut, ...)."""
    nf = 16
    p = param_shapes(make_config("ncsnv2_64", nf, 16, num_scales=4))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, p)
    assert sorted(p) == sorted(["Conv_0", "Conv_1", "InstanceNorm2dPlus_0"] + [f"ResidualBlock_{i}" for i in range(8)]
                               + [f"RefineBlock_{i}" for i in range(4)])
    assert shapes["Conv_0"]["kernel"] == (3, 3, 3, nf) and shapes["Conv_1"]["kernel"] == (3, 3, nf, 3)
    assert shapes["InstanceNorm2dPlus_0"] == {k: (1, 1, 1, nf) for k in ("alpha", "beta", "gamma")}
    pooled = shapes["ResidualBlock_2"]
    assert pooled["Conv_0"]["kernel"] == (3, 3, nf, nf)
    assert pooled["ConvMeanPool_0"]["Conv_0"]["kernel"] == (3, 3, nf, 2 * nf)
    assert pooled["ConvMeanPool_1"]["Conv_0"]["kernel"] == (1, 1, nf, 2 * nf)
    dilated = shapes["ResidualBlock_4"]
    assert [dilated[f"Conv_{i}"]["kernel"] for i in range(3)] == [(3, 3, 2 * nf, 2 * nf)] * 3
    assert sorted(shapes["RefineBlock_0"]) == ["CRPBlock_0", "RCUBlock_0", "RCUBlock_1"]
    last = shapes["RefineBlock_3"]
    assert sorted(last) == ["CRPBlock_0", "MSFBlock_0", "RCUBlock_0", "RCUBlock_1", "RCUBlock_2"]
    assert last["MSFBlock_0"]["Conv_1"]["kernel"] == (3, 3, 2 * nf, nf)       # score-SDE's 2 nf wide RefineBlock_2
    assert len(last["RCUBlock_2"]) == 6 and "bias" not in last["RCUBlock_2"]["Conv_5"]   # 3 blocks x 2 stages


def test_ncsn_tree_has_conditional_norms_per_level():
    nf, levels = 16, 7
    shapes = jax.tree_util.tree_map(lambda a: a.shape, param_shapes(make_config("ncsn", nf, 16, num_scales=levels)))
    down = shapes["ConditionalResidualBlock_2"]
    assert down["ConditionalInstanceNorm2dPlus_1"]["Embed_0"]["embedding"] == (levels, 3 * nf)
    last = shapes["CondRefineBlock_3"]
    assert last["CondMSFBlock_0"]["Conv_1"]["kernel"] == (3, 3, nf, nf)       # the original's nf wide third block
    assert last["CondCRPBlock_0"]["ConditionalInstanceNorm2dPlus_1"]["Embed_0"]["embedding"] == (levels, 3 * nf)
    assert shapes["ConditionalInstanceNorm2dPlus_0"]["Embed_0"]["embedding"] == (levels, 3 * nf)


# --- Forward passes of tiny networks (nf = 16). ---
# model.init compiles one random-number program per parameter shape (~15 s of CPU per network here), so the fast
# tests fill the parameter tree from eval_shape with numpy draws of the same kind (kernels U(±1/√fan_in), scales
# near 1, small biases); the real initializers run in the slow test below. apply is compiled once per network
# without XLA's expensive CPU optimizations (~3 s of CPU instead of ~8 s eager): that changes speed, not results.
TINY = {"ncsn": (28, 1), "ncsnv2_64": (16, 3), "ncsnv2_128": (16, 3), "ncsnv2_256": (16, 3)}   # (size, channels)
BATCH = 4
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def numpy_params(shapes, seed=0):
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
            return jnp.asarray(rng.uniform(-bound, bound, shape), jnp.float32)
        if name in ("bias", "beta"):
            return jnp.asarray(rng.uniform(-0.1, 0.1, shape), jnp.float32)
        return jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape), jnp.float32)   # alpha, gamma, embedding

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def tiny_network(name):
    """(model, variables, compiled apply for a batch of BATCH, x0 [1, H, W, C]) with numpy parameters."""
    size, channels = TINY[name]
    config = make_config(name, 16, size, channels=channels, num_scales=10, sigma_max=50.0)
    model = get_model(name)(config=config)
    x0 = jax.random.uniform(jax.random.PRNGKey(1), (1, size, size, channels))
    x, labels = jnp.repeat(x0, BATCH, 0), jnp.zeros(BATCH, jnp.int32)
    variables = numpy_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, labels))
    apply = jax.jit(model.apply).lower(variables, x, labels).compile(compiler_options=FAST_COMPILE)
    return model, variables, apply, x0


def run_tiny(name, x, labels):
    _, variables, apply, _ = tiny_network(name)
    return np.asarray(apply(variables, x, jnp.asarray(labels, jnp.int32)))


@pytest.mark.parametrize("name", TINY)
def test_tiny_networks_keep_the_input_shape(name):
    *_, x0 = tiny_network(name)
    x = x0 + 0.1 * jax.random.normal(jax.random.PRNGKey(2), (BATCH,) + x0.shape[1:])
    out = run_tiny(name, x, [0, 3, 6, 9])
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.std() > 0.0


def test_ncsn_output_depends_on_the_noise_level_and_not_on_the_batch():
    """One image under levels 0, 1, 2 gives three different outputs (γ, α, β are per level); a row's output does
    not change when the other rows of the batch do (statistics are per example)."""
    *_, x0 = tiny_network("ncsn")
    other = jax.random.uniform(jax.random.PRNGKey(3), x0.shape)
    out = run_tiny("ncsn", jnp.concatenate([x0, x0, x0, other]), [0, 1, 2, 0])
    gaps = [np.abs(out[i] - out[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))]
    # Level parameters differ by ~10% (numpy draws), outputs are ~1: gaps ~1e-1 against float32 noise ~1e-6.
    assert min(gaps) > 1e-2, gaps
    shuffled = run_tiny("ncsn", jnp.concatenate([x0, other, other, x0]), [0, 5, 9, 3])
    np.testing.assert_allclose(shuffled[0], out[0], rtol=1e-5, atol=1e-5)   # float32 reassociation only


def test_ncsnv2_output_scales_as_one_over_sigma():
    """NCSNv2 is unconditional: output(x, i) · σ_i is the same for every level i (float32 rounding only)."""
    model, *_, x0 = tiny_network("ncsnv2_64")
    labels = np.array([0, 4, 9, 9])
    out = run_tiny("ncsnv2_64", jnp.repeat(x0, BATCH, 0), labels)
    sigmas = np.asarray(get_sigmas(model.config))[labels]
    assert sigmas[0] == pytest.approx(50.0, rel=1e-6) and sigmas[2] == pytest.approx(0.01, rel=1e-5)
    scaled = out * sigmas[:, None, None, None]
    np.testing.assert_allclose(scaled[1], scaled[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scaled[2], scaled[0], rtol=1e-5, atol=1e-6)
    assert np.abs(out[2]).max() / np.abs(out[0]).max() == pytest.approx(5000.0, rel=1e-4)   # σ_max / σ_min


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ncsn", "ncsnv2_64"])
def test_real_initialization_gives_finite_level_dependent_outputs(name):
    """model.init's own initializers (PyTorch-default convs, 1 + N(0, 0.02²) norm scales): finite outputs; NCSN's
    levels already differ at init (γ, α differ by ~2%), NCSNv2's differ by exactly the factor σ_j / σ_i."""
    model, *_, x0 = tiny_network(name)
    labels = jnp.array([0, 9], jnp.int32)
    out, _ = model.init_with_output(jax.random.PRNGKey(0), jnp.repeat(x0, 2, 0), labels)
    out = np.asarray(out)
    assert np.all(np.isfinite(out)) and out.std() > 0.0
    if name == "ncsn":
        assert np.abs(out[0] - out[1]).max() > 1e-3   # ~1e-2 expected, float32 noise ~1e-6
    else:
        np.testing.assert_allclose(out[1] * 0.01, out[0] * 50.0, rtol=1e-4, atol=1e-6)


def test_sigma_of_a_label_is_the_ve_sde_level_sigma():
    """labels = sde.noise_labels(t, continuous=False) index get_sigmas at the VE SDE's discrete σ of t."""
    config = make_config("ncsnv2_64", 16, 16, num_scales=232, sigma_max=50.0)
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=232)
    t = jnp.linspace(0.0, 1.0, 57)
    labels = sde.noise_labels(t, continuous=False)
    expected = sde.discrete_marginal(jnp.zeros_like(t), sde.level_index(t))[1]
    np.testing.assert_allclose(get_sigmas(config)[labels], expected, rtol=1e-5)   # float32 exp/log rounding


def numpy_instance_norm_plus(x, gamma, alpha, beta, eps=1e-5):
    """Seed 004, Appendix A, written per (sample, channel) in float64."""
    mu = x.mean(axis=(1, 2))                                            # [B, C]
    s2 = x.var(axis=(1, 2))
    mu_tilde = (mu - mu.mean(axis=1, keepdims=True)) / np.sqrt(mu.var(axis=1, keepdims=True) + eps)
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        for c in range(x.shape[-1]):
            z = (x[b, :, :, c] - mu[b, c]) / np.sqrt(s2[b, c] + eps)
            out[b, :, :, c] = gamma[b, c] * (z + alpha[b, c] * mu_tilde[b, c]) + beta[b, c]
    return out


def test_conditional_instance_norm_plus_matches_the_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 2.0, (3, 5, 4, 6)) + rng.normal(0, 3.0, (3, 1, 1, 6))   # distinct channel means
    table = rng.normal(1.0, 0.5, (4, 18))
    y = np.array([2, 0, 2])
    norm = ConditionalInstanceNorm2dPlus(num_classes=4)
    out = norm.apply({"params": {"Embed_0": {"embedding": jnp.asarray(table, jnp.float32)}}},
                     jnp.asarray(x, jnp.float32), jnp.asarray(y))
    gamma, alpha, beta = table[y, :6], table[y, 6:12], table[y, 12:]
    # float32 statistics over 20 pixels of values ~5: relative error ~1e-6, outputs ~5.
    np.testing.assert_allclose(out, numpy_instance_norm_plus(x, gamma, alpha, beta), rtol=1e-4, atol=1e-4)


def test_instance_norm_plus_matches_the_formula_and_its_init():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.5, (2, 4, 4, 5)) + rng.normal(0, 2.0, (2, 1, 1, 5))
    norm = InstanceNorm2dPlus()
    params = norm.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))["params"]
    # Init: α, γ ~ 1 + N(0, 0.02²) (all within 5 sd = 0.1 of 1), β = 0.
    assert np.abs(np.asarray(params["alpha"]) - 1).max() < 0.1 and not np.any(np.asarray(params["beta"]))
    params = {k: jnp.asarray(rng.normal(1.0, 0.5, (1, 1, 1, 5)), jnp.float32) for k in ("alpha", "beta", "gamma")}
    out = norm.apply({"params": params}, jnp.asarray(x, jnp.float32))
    per_sample = {k: np.broadcast_to(np.asarray(v).reshape(1, 5), (2, 5)) for k, v in params.items()}
    expected = numpy_instance_norm_plus(x, per_sample["gamma"], per_sample["alpha"], per_sample["beta"])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)   # float32 statistics, as above


def test_align_corners_resize_is_exact_on_a_linear_ramp():
    """PyTorch's align_corners=True maps sample j of n_out to j (n_in − 1)/(n_out − 1): a ramp stays a ramp."""
    ramp = jnp.arange(4.0)[None, :, None, None] * jnp.ones((1, 1, 3, 1))
    up = resize_bilinear_align_corners(ramp, (7, 5))
    np.testing.assert_allclose(up[0, :, 0, 0], np.arange(7) * 3 / 6, atol=1e-6)
    np.testing.assert_allclose(up[0, 3, :, 0], np.full(5, 1.5), atol=1e-6)


@pytest.mark.parametrize("name,shape,labels,match", [
    ("ncsn", (1, 16, 16, 3), jnp.array([0.5]), "integer noise-level indices"),
    ("ncsnv2_128", (1, 18, 18, 3), jnp.array([0]), "divisible by 4"),
])
def test_user_errors_say_what_to_do(name, shape, labels, match):
    model = get_model(name)(config=make_config(name, 16, shape[1], num_scales=4))
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape), labels)
