"""Tests of the image score networks: DDPM, NCSN++ / DDPM++ (models/ddpm.py, ncsnpp.py, layerspp.py,
up_or_down_sampling.py and the DDPM layers in layers.py).

Parameter counts of the score-SDE CIFAR-10 configs (shapes from jax.eval_shape, no initialization) are compared
with `count_ddpm` / `count_ncsnpp` below: independent arithmetic from the layer shapes of the score-SDE
architecture (models/ddpm.py, ncsnpp.py, layers.py, layerspp.py of yang-song/score_sde), not calling the models.
Published numbers, where found:
- DDPM++ cont. (VP, CIFAR-10, configs/vp/cifar10_ddpmpp_continuous.py): 61,804,419, and NCSN++ at 256x256
  (configs/ve/celebahq_256_ncsnpp_continuous.py: 7 resolutions, FIR, output_skip / input_skip pyramids):
  65,574,549. Rectified Flow (gnobitab/RectifiedFlow) trains exactly these two score-SDE networks
  (configs/rectified_flow/cifar10_rf_gaussian_ddpmpp.py, celeba_hq_pytorch_rf_gaussian.py), and their counts
  are published as 61804419 (CIFAR-10) and 65574549 (256x256) in "Latent Zoning Network", appendix C.3,
  "Number of parameters in decoder". Our counts are the same.
- DDPM (Ho et al. 2020, CIFAR-10): 35.7M (35,746,307 in PyTorch ports of diffusion_tf). The score-SDE port has
  35,218,947: its upsampling path has one attention block per resolution (after the res blocks), where Ho et al.
  have one after every res block at 16x16, i.e. two more 256-channel attention blocks = 2 x 263,680 = 527,360.
  The test checks both numbers.
- NCSN++ cont. (VE, configs/ve/cifar10_ncsnpp_continuous.py): 62,758,915; deep versions (8 res blocks):
  107,587,075 (NCSN++ VE) and 106,632,579 (DDPM++). The paper gives no count. Later papers quote "about 62M" and
  "about 108M"; I could not check those quotes here, so only the independent counts are asserted.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models.ddpm  # noqa: F401  (registers "ddpm")
import models.ncsnpp  # noqa: F401  (registers "ncsnpp")
from models import get_model, layers, layerspp
from models import up_or_down_sampling as updown


# --- Configs (built here, field names as in the score-SDE configs). ---

def base_config(**model):
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(dict(image_size=32, num_channels=3, centered=False))
    config.model = ml_collections.ConfigDict(dict(
        sigma_min=0.01, sigma_max=50.0, num_scales=1000, dropout=0.1, normalization="GroupNorm",
        nonlinearity="swish", nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
        resamp_with_conv=True, conditional=True, scale_by_sigma=False, embedding_type="positional"))
    config.model.update(model)
    return config


def ddpm_config(**model):
    return base_config(name="ddpm", **model)


def ncsnpp_config(**model):
    """The NCSN++ cont. (VE) CIFAR-10 config; DDPM++ and the option combinations override fields."""
    defaults = dict(name="ncsnpp", scale_by_sigma=True, num_res_blocks=4, fir=True, fir_kernel=[1, 3, 3, 1],
                    skip_rescale=True, resblock_type="biggan", progressive="none", progressive_input="residual",
                    progressive_combine="sum", attention_type="ddpm", init_scale=0.0, fourier_scale=16,
                    conv_size=3, embedding_type="fourier")
    defaults.update(model)
    return base_config(**defaults)


DDPMPP = dict(scale_by_sigma=False, fir=False, progressive_input="none", embedding_type="positional")


def celebahq_256_config():
    config = ncsnpp_config(ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, dropout=0.0, progressive="output_skip",
                           progressive_input="input_skip")
    config.data.image_size = 256
    return config


def tiny(config, size=16, **data):
    """The same architecture at nf 16 (32 for DDPM's 32-group norms), two resolutions, one block, 16x16."""
    config.model.update(nf=32 if config.model.name == "ddpm" else 16, ch_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(size // 2,))
    config.data.update(image_size=size, **data)
    return config


def build(config):
    return get_model(config.model.name)(config=ml_collections.FrozenConfigDict(config))


def rbg_key(seed):
    """An RBG PRNG key: compiles in a fraction of the time of the default threefry key (a few s per shape here)."""
    return jax.random.key(seed, impl="rbg")


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def example_inputs(config, batch=2, seed=0):
    d = config.data
    x = jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, d.image_size, d.image_size, d.num_channels)),
                    jnp.float32)
    if config.model.embedding_type == "fourier":
        labels = jnp.geomspace(config.model.sigma_min, config.model.sigma_max, batch)   # σ
    else:
        labels = jnp.linspace(0, config.model.num_scales - 1, batch).astype(jnp.int32)   # levels
    return x, labels


def n_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def variable_shapes(config):
    """The variables' shapes from jax.eval_shape: the full tree, no initialization run."""
    x, labels = example_inputs(config, batch=1)
    return jax.eval_shape(build(config).init, jax.random.PRNGKey(0), x, labels)


def random_variables(config, seed=0, scale=0.1):
    """Variables of the model's exact tree filled with N(0, scale²) noise from numpy.

    Much cheaper here than model.init, which compiles every initializer (the forward tests would cost minutes), and
    no layer is zero, so zero-initialized output layers cannot hide how the output was formed.
    """
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32),
                                  variable_shapes(config))


# --- Independent parameter counts from the layer shapes of the score-SDE architecture. ---

def conv(k, cin, cout):
    return k * k * cin * cout + cout


def dense(cin, cout):  # also NIN
    return cin * cout + cout


def norm(c):  # GroupNorm scale and bias
    return 2 * c


def attn(c):
    return norm(c) + 4 * dense(c, c)


def resblock(cin, cout, temb, biggan, resample=False):
    """ResnetBlockDDPM(pp) (NIN shortcut when channels change) or ResnetBlockBigGANpp (1x1 conv shortcut)."""
    n = norm(cin) + conv(3, cin, cout) + (dense(temb, cout) if temb else 0) + norm(cout) + conv(3, cout, cout)
    if biggan:
        return n + (conv(1, cin, cout) if cin != cout or resample else 0)
    return n + (dense(cin, cout) if cin != cout else 0)


def count_ddpm(m, channels, size):
    temb = 4 * m.nf if m.conditional else 0
    total = dense(m.nf, temb) + dense(temb, temb) if m.conditional else 0
    res = functools.partial(resblock, temb=temb, biggan=False)
    total += conv(3, channels, m.nf)
    c, hs = m.nf, [m.nf]
    for level, mult in enumerate(m.ch_mult):
        for _ in range(m.num_res_blocks):
            total += res(c, m.nf * mult)
            c = m.nf * mult
            total += attn(c) if size in m.attn_resolutions else 0
            hs.append(c)
        if level != len(m.ch_mult) - 1:
            total += conv(3, c, c) if m.resamp_with_conv else 0
            hs.append(c)
            size //= 2
    total += 2 * res(c, c) + attn(c)
    for level in reversed(range(len(m.ch_mult))):
        for _ in range(m.num_res_blocks + 1):
            total += res(c + hs.pop(), m.nf * m.ch_mult[level])
            c = m.nf * m.ch_mult[level]
        total += attn(c) if size in m.attn_resolutions else 0
        if level != 0:
            total += conv(3, c, c) if m.resamp_with_conv else 0
            size *= 2
    return total + norm(c) + conv(3, c, channels)


def count_ncsnpp(m, channels, size):
    emb = 2 * m.nf if m.embedding_type == "fourier" else m.nf
    temb = 4 * m.nf if m.conditional else 0
    total = m.nf if m.embedding_type == "fourier" else 0  # the Fourier frequencies W
    total += dense(emb, temb) + dense(temb, temb) if m.conditional else 0
    biggan = m.resblock_type == "biggan"
    res = functools.partial(resblock, temb=temb, biggan=biggan)
    resample = functools.partial(res, resample=True) if biggan else (
        lambda c, _: conv(3, c, c) if m.resamp_with_conv else 0)
    total += conv(3, channels, m.nf)
    c, pyramid_c, hs = m.nf, channels, [m.nf]
    for level, mult in enumerate(m.ch_mult):
        for _ in range(m.num_res_blocks):
            total += res(c, m.nf * mult)
            c = m.nf * mult
            total += attn(c) if size in m.attn_resolutions else 0
            hs.append(c)
        if level != len(m.ch_mult) - 1:
            total += resample(c, c)
            size //= 2
            if m.progressive_input == "input_skip":  # FIR / pooling (no parameters), then Combine's 1x1 conv
                total += conv(1, pyramid_c, c)
                c = 2 * c if m.progressive_combine == "cat" else c
            elif m.progressive_input == "residual":  # a 3x3 (FIR-fused) downsampling conv to c channels
                total += conv(3, pyramid_c, c)
                pyramid_c = c
            hs.append(c)
    total += 2 * res(c, c) + attn(c)
    for level in reversed(range(len(m.ch_mult))):
        for _ in range(m.num_res_blocks + 1):
            total += res(c + hs.pop(), m.nf * m.ch_mult[level])
            c = m.nf * m.ch_mult[level]
        total += attn(c) if size in m.attn_resolutions else 0
        top = level == len(m.ch_mult) - 1
        if m.progressive == "output_skip":  # a GroupNorm + 3x3 conv head per resolution
            total += norm(c) + conv(3, c, channels)
        elif m.progressive == "residual":  # the head at the top, a 3x3 upsampling conv below
            total += norm(c) + conv(3, c, c) if top else conv(3, pyramid_c, c)
            pyramid_c = c
        if level != 0:
            total += resample(c, c)
            size *= 2
    return total if m.progressive == "output_skip" else total + norm(c) + conv(3, c, channels)


def expected_count(config):
    counter = count_ddpm if config.model.name == "ddpm" else count_ncsnpp
    return counter(config.model, config.data.num_channels, config.data.image_size)


# --- Reference configs: counts from eval_shape. ---

REFERENCE_CONFIGS = {
    "ddpm_cifar10": (ddpm_config(), 35_218_947),
    "ncsnpp_cifar10_continuous_ve": (ncsnpp_config(), 62_758_915),
    "ddpmpp_cifar10_continuous_vp": (ncsnpp_config(**DDPMPP), 61_804_419),
    "ncsnpp_cifar10_deep_continuous_ve": (ncsnpp_config(num_res_blocks=8), 107_587_075),
    "ddpmpp_cifar10_deep_continuous_vp": (ncsnpp_config(num_res_blocks=8, **DDPMPP), 106_632_579),
    "ncsnpp_celebahq_256_continuous_ve": (celebahq_256_config(), 65_574_549),
}


@functools.lru_cache(maxsize=None)
def reference_params(name):
    return variable_shapes(REFERENCE_CONFIGS[name][0])["params"]


@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_reference_parameter_counts(name):
    config, published = REFERENCE_CONFIGS[name]
    count = n_params(reference_params(name))
    # Exact: an integer that any missing, extra or mis-shaped layer changes.
    assert count == expected_count(config)
    assert count == published


def test_ddpm_count_differs_from_ho_et_al_by_two_attention_blocks():
    # Ho et al.'s CIFAR-10 U-Net: 35,746,307 parameters (35.7M in the paper); see the module docstring.
    assert expected_count(ddpm_config()) + 2 * attn(256) == 35_746_307


def test_ncsnpp_parameter_tree_has_score_sde_names():
    params = reference_params("ncsnpp_cifar10_continuous_ve")
    n = lambda prefix: sum(key.rsplit("_", 1)[0] == prefix for key in params)  # noqa: E731
    # 4 levels x 4 blocks + 3 down (encoder), 2 (middle), 4 x 5 + 3 up (decoder).
    assert n("ResnetBlockBigGANpp") == 44
    assert n("AttnBlockpp") == 6  # 4 at 16x16 in the encoder, 1 middle, 1 decoder
    assert n("Downsample") == 3  # the residual input pyramid
    assert params["GaussianFourierProjection_0"]["W"].shape == (128,)
    assert params["Dense_0"]["kernel"].shape == (256, 512)
    assert params["Conv_0"]["kernel"].shape == (3, 3, 3, 128)
    assert params["Downsample_0"]["Conv2d_0"]["weight"].shape == (3, 3, 3, 128)
    block = params["ResnetBlockBigGANpp_16"]  # the first block at 4x4 (256 channels in and out)
    assert set(block) == {"GroupNorm_0", "Conv_0", "Dense_0", "GroupNorm_1", "Conv_1"}
    assert set(params["AttnBlockpp_0"]) == {"GroupNorm_0", "NIN_0", "NIN_1", "NIN_2", "NIN_3"}
    assert set(params["AttnBlockpp_0"]["NIN_0"]) == {"W", "b"}


def test_ddpm_parameter_tree_has_score_sde_names():
    params = reference_params("ddpm_cifar10")
    n = lambda prefix: sum(key.rsplit("_", 1)[0] == prefix for key in params)  # noqa: E731
    assert (n("ResnetBlockDDPM"), n("AttnBlock"), n("Downsample"), n("Upsample")) == (22, 4, 3, 3)
    assert set(params) >= {"Dense_0", "Dense_1", "Conv_0", "Conv_1", "GroupNorm_0"}
    assert set(params["ResnetBlockDDPM_2"]) == {"GroupNorm_0", "Conv_0", "Dense_0", "GroupNorm_1", "Conv_1",
                                                "NIN_0"}  # 128 -> 256 channels: a NIN shortcut
    assert params["Conv_1"]["kernel"].shape == (3, 3, 128, 3)


# --- Tiny configs: init + apply for the option combinations. ---

TINY = {
    "ncsnpp_ve": ncsnpp_config(),
    "ddpmpp_vp": ncsnpp_config(**DDPMPP),
    "ddpm_block_fir_output_skip_input_skip_cat_uncond": ncsnpp_config(
        resblock_type="ddpm", progressive="output_skip", progressive_input="input_skip", progressive_combine="cat",
        conditional=False, scale_by_sigma=False),
    "ddpm_block_residual_pyramids_positional_scaled": ncsnpp_config(
        resblock_type="ddpm", fir=False, progressive="residual", embedding_type="positional"),
    "biggan_output_skip_input_skip_sum": ncsnpp_config(
        progressive="output_skip", progressive_input="input_skip", embedding_type="positional", init_scale=1.0),
    "ddpm_block_naive_resampling_cat": ncsnpp_config(
        resblock_type="ddpm", fir=False, resamp_with_conv=False, progressive="output_skip",
        progressive_input="input_skip", progressive_combine="cat", scale_by_sigma=False),
    "biggan_residual_output_unscaled": ncsnpp_config(progressive="residual", scale_by_sigma=False, skip_rescale=False),
    "ddpm": ddpm_config(),
    "ddpm_unconditional_scaled_no_resample_conv": ddpm_config(conditional=False, scale_by_sigma=True,
                                                              resamp_with_conv=False),
}


def tiny_setup(name):
    config = tiny(TINY[name].copy_and_resolve_references())
    return config, build(config), random_variables(config), *example_inputs(config)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_forward(name):
    config, model, variables, x, labels = tiny_setup(name)
    out = model.apply(variables, x, labels)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    # Exact: the tree has the independently counted number of parameters.
    assert n_params(variables["params"]) == expected_count(config)


def test_init_output_is_near_zero():
    config = tiny(ncsnpp_config())
    config.model.scale_by_sigma = False
    model, (x, labels) = build(config), example_inputs(config)
    variables = jax.jit(model.init)(rbg_key(1), x, labels)  # jitted: one compilation, not one per initializer
    assert n_params(variables["params"]) == expected_count(config)
    # The last convolution is initialized with scale 1e-10 (init_scale 0): weights ~1e-6, so the output is
    # ~1e-5 while the activations feeding it are O(1); 1e-3 leaves two orders of magnitude either way.
    assert float(jnp.max(jnp.abs(model.apply(variables, x, labels)))) < 1e-3


@pytest.mark.parametrize("name", ["ncsnpp_ve", "ddpm_block_residual_pyramids_positional_scaled",
                                  "ddpm_unconditional_scaled_no_resample_conv"])
def test_scale_by_sigma_divides_by_the_label_sigma(name):
    config, model, variables, x, labels = tiny_setup(name)
    config.model.scale_by_sigma = False
    unscaled = build(config).apply(variables, x, labels)
    scaled = model.apply(variables, x, labels)
    # σ is the label itself (Fourier, VE continuous) or sigmas[label] (positional / DDPM), σ_max first.
    sigma = labels if config.model.embedding_type == "fourier" and config.model.name == "ncsnpp" else (
        layers.get_sigmas(config)[labels])
    # float32 division: relative error ~1e-6.
    np.testing.assert_allclose(scaled * sigma[:, None, None, None], unscaled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ncsnpp_ve", "ddpm"])
def test_uncentered_input_is_mapped_to_minus_one_one(name):
    config, model, variables, x, labels = tiny_setup(name)
    config.data.centered = True
    centered = build(config).apply(variables, 2 * x - 1, labels)
    # Same computation up to float32 rounding of 2x - 1 (~1e-7 relative), through ~20 layers.
    np.testing.assert_allclose(model.apply(variables, x, labels), centered, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ncsnpp_ve", "ddpm"])
def test_dropout_is_active_only_in_train_mode(name):
    config, model, variables, x, labels = tiny_setup(name)
    train = [model.apply(variables, x, labels, train=True, rngs={"dropout": rbg_key(s)}) for s in (3, 4)]
    evals = [model.apply(variables, x, labels) for _ in range(2)]
    assert float(jnp.max(jnp.abs(evals[0] - evals[1]))) == 0.0  # deterministic
    # Dropout 0.1 on every block: two masks change the output by O(its size), far above float error.
    assert float(jnp.max(jnp.abs(train[0] - train[1]))) > 1e-3 * float(jnp.max(jnp.abs(evals[0])))
    assert float(jnp.max(jnp.abs(train[0] - evals[0]))) > 1e-3 * float(jnp.max(jnp.abs(evals[0])))


@pytest.mark.parametrize("name", ["ncsnpp_ve", "ddpmpp_vp", "ddpm"])
def test_output_depends_on_labels_only_when_conditional(name):
    config = tiny(TINY[name].copy_and_resolve_references())
    config.model.scale_by_sigma = False
    for conditional in (True, False):
        config.model.conditional = conditional
        model, variables, (x, labels) = build(config), random_variables(config), example_inputs(config)
        a = model.apply(variables, x, labels)
        b = model.apply(variables, x, labels[::-1])  # the same images with the other noise level
        change = float(jnp.max(jnp.abs(a - b)))
        # Unconditional: the labels are ignored exactly; conditional: the time biases move every block.
        assert (change > 1e-4) if conditional else (change == 0.0)


def test_bad_options_and_shapes_raise_value_errors():
    config = tiny(ncsnpp_config())
    x, labels = example_inputs(config)
    for field, value in [("progressive", "skip"), ("resblock_type", "resnet"), ("embedding_type", "learned"),
                         ("progressive_input", "cat")]:
        bad = config.copy_and_resolve_references()
        bad.model[field] = value
        with pytest.raises(ValueError, match=field):
            jax.eval_shape(build(bad).init, jax.random.PRNGKey(0), x, labels)
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(build(config).init, jax.random.PRNGKey(0), x[:, :15, :15], labels)
    bad = tiny(ddpm_config(normalization="InstanceNorm++"))
    with pytest.raises(ValueError, match="normalization"):
        jax.eval_shape(build(bad).init, jax.random.PRNGKey(0), *example_inputs(bad))


# --- Layers. ---

def test_get_sigmas_is_geometric_from_sigma_max_to_sigma_min():
    sigmas = np.asarray(layers.get_sigmas(base_config(num_scales=11)))
    # float32 exp/log: ~1e-6 relative.
    np.testing.assert_allclose(sigmas[[0, -1]], [50.0, 0.01], rtol=1e-5)
    np.testing.assert_allclose(sigmas[1:] / sigmas[:-1], (0.01 / 50.0) ** 0.1, rtol=1e-5)


def test_spatial_attention_with_equal_keys_averages_the_values():
    q, v = normal(0, (2, 2, 3, 4, 5))
    out = layers.spatial_self_attention(q, jnp.zeros_like(q), v)
    # Equal logits: softmax is uniform, every position gets the mean value (float32 sums: ~1e-6).
    np.testing.assert_allclose(out, jnp.broadcast_to(v.mean(axis=(1, 2), keepdims=True), v.shape), atol=1e-5)


def test_attention_blocks_are_identity_at_init():
    # The output NIN is zero-initialized (scale 1e-10): x + ~1e-5 · O(1).
    x = normal(0, (1, 4, 4, 32))
    for block in (layers.AttnBlock(), layerspp.AttnBlockpp(skip_rescale=False)):
        out = block.apply(block.init(rbg_key(1), x), x)
        np.testing.assert_allclose(out, x, atol=1e-3)


# --- FIR resampling. ---

def test_fir_resampling_of_a_constant_image():
    ones = jnp.ones((1, 8, 8, 1))
    up = np.asarray(updown.upsample_2d(ones))[0, :, :, 0]
    down = np.asarray(updown.downsample_2d(ones))[0, :, :, 0]
    # [1,3,3,1] normalized: constant inside; at the border one tap of weight 1/4 (up) or 1/8 (down) falls
    # outside the image on each axis: 3/4 and 7/8 per axis, their squares at the corners. float32: 1e-6.
    np.testing.assert_allclose(up[1:-1, 1:-1], 1.0, atol=1e-6)
    np.testing.assert_allclose([up[0, 5], up[0, 0]], [0.75, 0.75**2], atol=1e-6)
    np.testing.assert_allclose(down[1:-1, 1:-1], 1.0, atol=1e-6)
    np.testing.assert_allclose([down[0, 2], down[0, 0]], [0.875, 0.875**2], atol=1e-6)


def test_box_kernel_resampling_equals_naive_resampling():
    x = normal(0, (2, 8, 8, 3))
    # Exact up to float32 rounding of 0.25-weighted sums.
    np.testing.assert_allclose(updown.upsample_2d(x, (1, 1)), updown.naive_upsample_2d(x), atol=1e-6)
    np.testing.assert_allclose(updown.downsample_2d(x, (1, 1)), updown.naive_downsample_2d(x), atol=1e-6)
    np.testing.assert_allclose(updown.naive_upsample_2d(x)[:, 5, 3], x[:, 2, 1])


def test_fused_resampling_convolutions_equal_the_unfused_ones_inside():
    x, w = normal(0, (2, 16, 16, 3)), normal(1, (3, 3, 3, 4))
    conv_same = lambda a: jax.lax.conv_general_dilated(  # noqa: E731
        a, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    up_fused, up = updown.upsample_conv_2d(x, w), conv_same(updown.upsample_2d(x))
    down_fused, down = updown.conv_downsample_2d(x, w), updown.downsample_2d(conv_same(x))
    assert up_fused.shape == (2, 32, 32, 4) and down_fused.shape == (2, 8, 8, 4)
    # Same linear map away from the border (which the fused op pads only once); float32 sums of ~100 terms.
    np.testing.assert_allclose(up_fused[:, 3:-3, 3:-3], up[:, 3:-3, 3:-3], atol=1e-4)
    np.testing.assert_allclose(down_fused[:, 2:-2, 2:-2], down[:, 2:-2, 2:-2], atol=1e-4)
    assert float(jnp.max(jnp.abs(up_fused - up))) > 1e-2  # the border does differ: the test sees alignment
