"""Building blocks of the RefineNet score networks: NCSN (seed 004) and NCSNv2 (Song & Ermon 2020).

A ResNet encoder with dilated convolutions (ResidualBlock) feeds a RefineNet decoder (RefineBlock = residual conv
units RCU, multi-resolution fusion MSF, chained residual pooling CRP). NCSN v1 conditions every normalization on
the noise-level index ("Cond" blocks, called with (x, y)); NCSNv2 is unconditional and divides its output by σ.

Module classes and their call order reproduce the score-SDE (JAX) code, so flax gives the same automatic names
(Conv_0, ResidualBlock_3, RefineBlock_1/MSFBlock_0, ...) and the released parameter trees map 1:1. Differences:
- every convolution, ConvMeanPool's included, is initialized like PyTorch's default (kernel and bias
  U(±1/√fan_in)), as in the NCSN / NCSNv2 originals; score-SDE leaves ConvMeanPool at flax's default init;
- the score-SDE ConditionalResidualBlock calls its second norm wrongly on the "down" path (it cannot run); here it
  is ConditionalInstanceNorm2dPlus_1, the name the corrected code gives it;
- a RefineBlock fuses (MSF) when given more than one input (the originals' rule); score-SDE's `start` flag says
  the same thing, so it is not an argument here.
"""
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.layers import get_act, get_sigmas  # noqa: F401  (re-exported for the RefineNet models)

# --- Convolutions with PyTorch's default initialization (as in NCSN / NCSNv2). ---

def torch_kernel_init():
    """PyTorch's Conv2d default, kaiming_uniform(a=√5): U(±1/√fan_in)."""
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias_init(fan_in):
    """PyTorch's Conv2d bias default: U(±1/√fan_in), fan_in = k·k·C_in."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(x, features, kernel_size=3, bias=True, dilation=1):
    """A stride-1 'SAME' convolution created in the calling module's scope (so it is named Conv_k there)."""
    fan_in = kernel_size * kernel_size * x.shape[-1]
    return nn.Conv(features, (kernel_size, kernel_size), padding="SAME", use_bias=bias,
                   kernel_dilation=(dilation, dilation), kernel_init=torch_kernel_init(),
                   bias_init=torch_bias_init(fan_in))(x)


def mean_pool_2x2(x):
    """The mean over non-overlapping 2x2 windows; H and W must be even."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ConvMeanPool(nn.Module):
    """Convolution, then 2x2 mean pooling: the downsampling of the ResNet encoder."""

    output_dim: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x):
        return mean_pool_2x2(conv(x, self.output_dim, self.kernel_size))


# --- Resizing for multi-resolution fusion, by config.model.interpolation. ---

def align_corners_matrix(n_in, n_out):
    """[n_out, n_in] linear-interpolation weights mapping sample j to position j (n_in − 1)/(n_out − 1)."""
    pos = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
    lo = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    frac = pos - lo
    weights = np.zeros((n_out, n_in), np.float32)
    weights[np.arange(n_out), lo] += 1.0 - frac
    weights[np.arange(n_out), np.minimum(lo + 1, n_in - 1)] += frac
    return jnp.asarray(weights)


def resize_bilinear_align_corners(x, shape):
    """Bilinear resizing with aligned corners (PyTorch align_corners=True, the NCSN / NCSNv2 originals)."""
    x = jnp.einsum("oh,bhwc->bowc", align_corners_matrix(x.shape[1], shape[0]), x)
    return jnp.einsum("ow,bhwc->bhoc", align_corners_matrix(x.shape[2], shape[1]), x)


def _jax_resize(method):
    def resize(x, shape):
        return jax.image.resize(x, (x.shape[0], *shape, x.shape[-1]), method)

    return resize


_RESIZERS = {
    "bilinear": _jax_resize("bilinear"),        # half-pixel centres (score-SDE, JAX)
    "nearest_neighbor": _jax_resize("nearest"),
    "bilinear_align_corners": resize_bilinear_align_corners,
}


def resize(x, shape, interpolation):
    """x [B, H, W, C] -> [B, *shape, C] by config.model.interpolation."""
    if interpolation not in _RESIZERS:
        raise ValueError(f"unknown interpolation {interpolation!r}; set config.model.interpolation to one of "
                         f"{sorted(_RESIZERS)}")
    return _RESIZERS[interpolation](x, tuple(shape))


# --- The ResNet encoder block. ---

class ResidualBlock(nn.Module):
    """Pre-activation residual block: norm, act, conv, norm, act, conv, plus a shortcut (NCSNv2).

    resample="down" halves H, W by ConvMeanPool when dilation == 1; a dilated "down" block keeps the resolution
    and widens the receptive field instead (the "dilated" of CondRefineNetDilated). The shortcut is the identity
    when nothing changes, else a 1x1 conv (3x3 dilated conv when dilated, ConvMeanPool when pooling).
    `cond` (the labels, for ConditionalResidualBlock) is passed on to every normalization.
    """

    output_dim: int
    normalization: Callable
    resample: Optional[str] = None
    act: Callable = nn.elu
    dilation: int = 1

    @nn.compact
    def __call__(self, x, *cond):
        h = self.act(self.normalization()(x, *cond))
        if self.resample == "down":
            return self._down(x, h, cond)
        if self.resample is None:
            return self._same(x, h, cond)
        raise ValueError(f"resample must be 'down' or None, got {self.resample!r}")

    def _down(self, x, h, cond):
        h = conv(h, x.shape[-1], dilation=self.dilation)
        h = self.act(self.normalization()(h, *cond))
        if self.dilation > 1:
            h = conv(h, self.output_dim, dilation=self.dilation)
            return h + conv(x, self.output_dim, dilation=self.dilation)
        h = ConvMeanPool(self.output_dim)(h)
        return h + ConvMeanPool(self.output_dim, kernel_size=1)(x)

    def _same(self, x, h, cond):
        shortcut = x
        if self.output_dim != x.shape[-1]:
            # Created before the main path's convs, so it is Conv_0 (the score-SDE order).
            shortcut = conv(x, self.output_dim, kernel_size=3 if self.dilation > 1 else 1, dilation=self.dilation)
        h = conv(h, self.output_dim, dilation=self.dilation)
        h = self.act(self.normalization()(h, *cond))
        return conv(h, self.output_dim, dilation=self.dilation) + shortcut


class ConditionalResidualBlock(ResidualBlock):
    """ResidualBlock with noise-conditional norms, called (x, y) (NCSN v1)."""


# --- The RefineNet decoder blocks (unconditional: NCSNv2; "Cond": NCSN v1, with a norm before each conv). ---

class RCUBlock(nn.Module):
    """Residual conv units: n_blocks times x ← x + (act → conv)^n_stages (x); bias-free convs."""

    features: int
    n_blocks: int
    n_stages: int
    act: Callable = nn.relu
    normalizer: Optional[Callable] = None

    @nn.compact
    def __call__(self, x, *cond):
        for _ in range(self.n_blocks):
            residual = x
            for _ in range(self.n_stages):
                if self.normalizer is not None:
                    x = self.normalizer()(x, *cond)
                x = conv(self.act(x), self.features, bias=False)
            x = x + residual
        return x


class CondRCUBlock(RCUBlock):
    """RCUBlock with a conditional norm before each activation (NCSN v1)."""


class MSFBlock(nn.Module):
    """Multi-resolution fusion: Σ_i resize(conv3x3(x_i)) to `shape` (convs with bias)."""

    shape: Sequence[int]
    features: int
    interpolation: str = "bilinear"
    normalizer: Optional[Callable] = None

    @nn.compact
    def __call__(self, xs, *cond):
        total = 0.0
        for x in xs:
            if self.normalizer is not None:
                x = self.normalizer()(x, *cond)
            total = total + resize(conv(x, self.features), self.shape, self.interpolation)
        return total


class CondMSFBlock(MSFBlock):
    """MSFBlock with a conditional norm on each input (NCSN v1)."""


def _max_pool_5x5(x):
    return nn.max_pool(x, (5, 5), strides=(1, 1), padding="SAME")


def _avg_pool_5x5(x):
    # count_include_pad=True: zero padding, divide by 25 everywhere (PyTorch AvgPool2d's default).
    return nn.avg_pool(x, (5, 5), strides=(1, 1), padding="SAME", count_include_pad=True)


class CRPBlock(nn.Module):
    """Chained residual pooling: x = act(x); path ← conv(pool(path)); x ← x + path, n_stages times.

    NCSNv2 pools by 5x5 max; NCSN v1 (CondCRPBlock) normalizes and pools by 5x5 average.
    """

    features: int
    n_stages: int
    act: Callable = nn.relu
    normalizer: Optional[Callable] = None
    pool = staticmethod(_max_pool_5x5)

    @nn.compact
    def __call__(self, x, *cond):
        x = self.act(x)
        path = x
        for _ in range(self.n_stages):
            if self.normalizer is not None:
                path = self.normalizer()(path, *cond)
            path = conv(self.pool(path), self.features, bias=False)
            x = x + path
        return x


class CondCRPBlock(CRPBlock):
    """CRPBlock with conditional norms and average pooling (NCSN v1)."""

    pool = staticmethod(_avg_pool_5x5)


class RefineBlock(nn.Module):
    """RCU (2x2) on each input, MSF to output_shape when there are several, CRP, output RCU (3 blocks at the end).

    Submodules in call order: RCUBlock_0[, RCUBlock_1, MSFBlock_0], CRPBlock_0, then the output RCUBlock.
    """

    output_shape: Sequence[int]
    features: int
    act: Callable = nn.relu
    interpolation: str = "bilinear"
    end: bool = False
    normalizer: Optional[Callable] = None
    rcu = RCUBlock
    msf = MSFBlock
    crp = CRPBlock

    @nn.compact
    def __call__(self, xs, *cond):
        blocks = dict(act=self.act, normalizer=self.normalizer)
        hs = [self.rcu(x.shape[-1], n_blocks=2, n_stages=2, **blocks)(x, *cond) for x in xs]
        h = hs[0]
        if len(hs) > 1:
            h = self.msf(self.output_shape, self.features, self.interpolation, self.normalizer)(hs, *cond)
        h = self.crp(self.features, n_stages=2, **blocks)(h, *cond)
        return self.rcu(self.features, n_blocks=3 if self.end else 1, n_stages=2, **blocks)(h, *cond)


class CondRefineBlock(RefineBlock):
    """RefineBlock built from the conditional blocks (NCSN v1); called (xs, y)."""

    rcu = CondRCUBlock
    msf = CondMSFBlock
    crp = CondCRPBlock


# --- The whole network, shared by NCSN v1 and the NCSNv2 family. ---

def refinenet(x, cond, *, nf, stages, widths, act, normalizer, interpolation, residual_block, refine_block):
    """conv → ResNet stages → RefineBlocks from the deepest skip to the shallowest → norm → act → conv.

    stages: (width multiple, resample, dilation) per stage; a stage is a resampling ResidualBlock and a plain one,
    and its output is a skip. widths: the RefineBlock width multiples, deepest first (one per stage).
    """
    h = conv(x, nf)
    skips = []
    for mult, resample, dilation in stages:
        for block_resample in (resample, None):
            h = residual_block(mult * nf, normalizer, block_resample, act, dilation)(h, *cond)
        skips.append(h)
    ref = None
    for i, (skip, mult) in enumerate(zip(reversed(skips), widths)):
        inputs = [skip] if ref is None else [skip, ref]
        ref = refine_block(skip.shape[1:3], mult * nf, act, interpolation, end=i == len(skips) - 1)(inputs, *cond)
    h = act(normalizer()(ref, *cond))
    return conv(h, x.shape[-1])


def check_image_size(x, stages, name):
    """The encoder halves H, W at each undilated "down" stage, so both must be divisible by 2^k."""
    factor = 2 ** sum(1 for _, resample, dilation in stages if resample == "down" and dilation == 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(f"{name} takes NHWC images with H and W divisible by {factor}; got shape {x.shape}")


def check_level_labels(labels, name):
    """NCSN-family networks take integer noise-level indices (sde.noise_labels(t, continuous=False))."""
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} conditions on integer noise-level indices, got labels of dtype {labels.dtype}; "
                         "train and sample it with config.training.continuous = False")


def center_input(x, config):
    """2x − 1 when the data are in [0, 1] (config.data.centered False), as the score-SDE networks do."""
    return x if config.data.centered else 2.0 * x - 1.0


def scale_by_sigma(h, labels, config):
    """h / σ_label when config.model.scale_by_sigma (NCSNv2's noise conditioning), σ from get_sigmas."""
    if not config.model.scale_by_sigma:
        return h
    used_sigmas = get_sigmas(config)[labels]
    return h / used_sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
