"""A small CNN classifier of grey digit-like images (the embedded DIGITS, MNIST5K and Fashion-MNIST sets) whose
penultimate features and logits stand in for the Inception's in the sample-quality metrics of SPEC §8: the
Fréchet classifier distance (FCD, the FID formula on these features), the kernel classifier distance (KCD, KID's)
and the classifier score (the Inception Score's formula on its predictions). On 8x8 or 28x28 grey digits the
ImageNet Inception means little, and its weights are not at hand offline; this network trains on a CPU in
seconds (DIGITS) to minutes (28x28 sets) with scripts/train_digit_classifier.py.

Input: images [B, H, W, C] in [0, 1] (the integer image k shown as k / (levels - 1), like a saved PNG).
Output: {"features": [B, feature_dim] (after ReLU, like Inception's pool_3), "logits": [B, num_classes]}.
Weights file (msgpack, flax.serialization): {"params": the flax params, "meta": {"dataset", "image_shape",
"num_classes", "width", "feature_dim", "levels", "test_accuracy", "seed", "steps"} and, for a noise-conditional
classifier, "noise_conditional", "sde", "centered" (the data range it saw) and "test_accuracy_t05"}.
"""
import functools
import os

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from models import layers


class DigitClassifier(nn.Module):
    """Three 3x3 convolutions (width, then 2·width twice, after a 2x2 average pool), a global average, a dense
    feature layer and the class logits.

    noise_conditional: the time-dependent classifier p_t(y | x_t) of class-conditional sampling (score-SDE paper,
    Appendix I): the input is a diffused sample x_t as the score model sees it (data space, not [0, 1]) and t [B]
    enters through a sinusoidal embedding of 999 t added to the first convolution's channels.
    """

    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128
    noise_conditional: bool = False

    @nn.compact
    def __call__(self, images, t=None):
        if self.noise_conditional:
            x = nn.Conv(self.width, (3, 3), name="conv0")(images)
            embedding = layers.sinusoidal_embedding(999.0 * t, self.width)
            x = nn.relu(x + nn.Dense(self.width, name="time")(embedding)[:, None, None, :])
        else:
            x = nn.relu(nn.Conv(self.width, (3, 3), name="conv0")(2.0 * images - 1.0))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), name="conv2")(x))
        features = nn.relu(nn.Dense(self.feature_dim, name="features")(jnp.mean(x, axis=(1, 2))))
        return {"features": features, "logits": nn.Dense(self.num_classes, name="logits")(features)}


@functools.partial(jax.jit, static_argnums=0)
def classify(module, params, images, t=None):
    """module.apply({"params": params}, images[, t]), compiled once per module configuration and batch shape."""
    return module.apply({"params": params}, images, t)


_META_KEYS = ("dataset", "image_shape", "num_classes", "width", "feature_dim", "levels", "test_accuracy", "seed",
              "steps")


def save_classifier(path, params, meta):
    """Writes {"params", "meta"} to `path` (msgpack); meta must hold the keys of the module docstring."""
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"classifier metadata lacks {missing}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    meta = dict(meta, image_shape=np.asarray(meta["image_shape"], np.int64))
    state = {"params": flax.serialization.to_state_dict(params), "meta": meta}
    with open(path, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(state))


def load_classifier(path):
    """(module, params, meta) from a file written by save_classifier."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"classifier weights {path!r} not found: train them with "
                         f"python scripts/train_digit_classifier.py --dataset=DIGITS --output={path}")
    with open(path, "rb") as f:
        try:
            state = flax.serialization.msgpack_restore(f.read())
        except Exception as error:  # msgpack raises several unrelated types on foreign bytes
            raise ValueError(f"{path} is not a classifier file of scripts/train_digit_classifier.py: {error}")
    if not isinstance(state, dict) or set(state) != {"params", "meta"}:
        raise ValueError(f"{path} is not a classifier file of scripts/train_digit_classifier.py")
    meta = state["meta"]
    module = DigitClassifier(int(meta["num_classes"]), int(meta["width"]), int(meta["feature_dim"]),
                             bool(meta.get("noise_conditional", False)))
    meta = dict(meta, image_shape=tuple(int(s) for s in np.asarray(meta["image_shape"]).ravel()))
    return module, state["params"], meta
