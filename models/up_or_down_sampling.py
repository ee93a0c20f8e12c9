"""FIR-filtered 2x resampling of NHWC images (StyleGAN2's upfirdn), as NCSN++ uses it.

`upfirdn_2d` is the one primitive: insert zeros (upsampling), pad or crop, convolve each channel with a 2-D
FIR kernel, keep every `down`-th pixel. A 1-D kernel such as (1, 3, 3, 1) means its outer product, normalized
to sum 1, so a constant image stays constant away from the border. `Conv2d` fuses that filter with a learned
3x3 convolution; its parameters are named `weight` [k, k, in, out] and `bias`, as in the score-SDE code, so
checkpoints map 1:1.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def fir_kernel_2d(k):
    """The normalized 2-D FIR kernel (outer product of a 1-D kernel, or a square 2-D one), summing to 1."""
    k = np.asarray(k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"a FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
    return k / np.sum(k)


def upfirdn_2d(x, kernel, up=1, down=1, pad=(0, 0)):
    """Zero-insert by `up`, pad by pad = (before, after) (crop where negative), convolve with `kernel`, subsample.

    The same for both spatial axes and every channel. Output size: (H·up + before + after - K) // down + 1.
    """
    c = x.shape[-1]
    before, after = pad
    # Interior padding inserts up-1 zeros between pixels; the extra up-1 at the end gives the trailing zeros
    # of "one pixel, then up-1 zeros" upsampling. lax.pad crops where the padding is negative.
    spatial = (before, after + up - 1, up - 1)
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), spatial, spatial, (0, 0, 0)])
    taps = jnp.asarray(kernel[::-1, ::-1], x.dtype)  # flipped: a convolution, not a correlation
    depthwise = jnp.tile(taps[:, :, None, None], (1, 1, 1, c))
    return lax.conv_general_dilated(x, depthwise, (down, down), "VALID", dimension_numbers=_NHWC,
                                    feature_group_count=c)


def upsample_2d(x, k=(1, 3, 3, 1), factor=2, gain=1.0):
    """[N, H, W, C] -> [N, fH, fW, C]: zero-insertion upsampling followed by the FIR filter (gain f² keeps DC)."""
    kernel = fir_kernel_2d(k) * (gain * factor**2)
    p = kernel.shape[0] - factor
    return upfirdn_2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x, k=(1, 3, 3, 1), factor=2, gain=1.0):
    """[N, H, W, C] -> [N, H/f, W/f, C]: the FIR filter followed by subsampling."""
    kernel = fir_kernel_2d(k) * gain
    p = kernel.shape[0] - factor
    return upfirdn_2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x, w, k=(1, 3, 3, 1), factor=2, gain=1.0):
    """upsample_2d followed by a convolution with w [kh, kh, in, out], fused: one transposed convolution, then
    the FIR filter, padded once. Equals conv(upsample_2d(x), w, SAME) away from the border."""
    kh = w.shape[0]
    kernel = fir_kernel_2d(k) * (gain * factor**2)
    # Transposed convolution (stride `factor`): correlate the zero-dilated input with w, fully padded.
    tail = factor - 1 + max(kh - factor, 0)
    x = lax.conv_general_dilated(x, w, (1, 1), [(kh - 1, tail)] * 2, lhs_dilation=(factor, factor),
                                 dimension_numbers=_NHWC)
    p = (kernel.shape[0] - factor) - (kh - 1)
    return upfirdn_2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x, w, k=(1, 3, 3, 1), factor=2, gain=1.0):
    """A convolution with w [kh, kh, in, out] followed by downsample_2d, fused: the FIR filter, then one strided
    convolution. Equals downsample_2d(conv(x, w, SAME)) away from the border."""
    kh = w.shape[0]
    kernel = fir_kernel_2d(k) * gain
    p = (kernel.shape[0] - factor) + (kh - 1)
    x = upfirdn_2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return lax.conv_general_dilated(x, w, (factor, factor), "VALID", dimension_numbers=_NHWC)


def naive_upsample_2d(x, factor=2):
    """Nearest-neighbour upsampling: each pixel repeated factor x factor times."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x, factor=2):
    """Average pooling over non-overlapping factor x factor windows."""
    n, h, w, c = x.shape
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class Conv2d(nn.Module):
    """A k x k convolution, optionally fused with FIR 2x upsampling (up) or downsampling (down)."""

    features: int
    kernel_size: int = 3
    up: bool = False
    down: bool = False
    resample_kernel: Sequence[int] = (1, 3, 3, 1)
    use_bias: bool = True
    kernel_init: Optional[Any] = None

    @nn.compact
    def __call__(self, x):
        if self.up and self.down:
            raise ValueError("Conv2d resamples up or down, not both")
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        w = self.param("weight", self.kernel_init or nn.initializers.lecun_normal(), shape)
        if self.up:
            x = upsample_conv_2d(x, w, k=self.resample_kernel)
        elif self.down:
            x = conv_downsample_2d(x, w, k=self.resample_kernel)
        else:
            x = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.features,))
        return x
