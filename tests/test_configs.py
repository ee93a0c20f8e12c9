"""The shipped configs: each loads, has the documented fields with the right types and the project's conventions,
the tree mirrors the score-SDE reference, and every image config builds its network (jax.eval_shape at full size,
a real forward pass of its `configs.smoke` variant). Network tests run once per distinct network, a representative
subset by default and the rest under -m slow; they skip while a model name is not registered yet."""
import functools
import importlib
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import configs
import losses
import models
import run_lib
import sampling
import sde_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

# Every experiment file of the score-SDE reference's configs/ (yang-song/score_sde; its PyTorch port has the same).
REFERENCE_EXPERIMENTS = {
    "subvp/cifar10_ddpm_continuous.py", "subvp/cifar10_ddpmpp_continuous.py",
    "subvp/cifar10_ddpmpp_deep_continuous.py", "subvp/cifar10_ncsnpp_continuous.py",
    "subvp/cifar10_ncsnpp_deep_continuous.py",
    "ve/bedroom_ncsnpp_continuous.py", "ve/celeba_ncsnpp.py", "ve/celebahq_256_ncsnpp_continuous.py",
    "ve/celebahq_ncsnpp_continuous.py", "ve/church_ncsnpp_continuous.py", "ve/cifar10_ddpm.py",
    "ve/cifar10_ncsnpp.py", "ve/cifar10_ncsnpp_continuous.py", "ve/cifar10_ncsnpp_deep_continuous.py",
    "ve/ffhq_256_ncsnpp_continuous.py", "ve/ffhq_ncsnpp_continuous.py",
    "ve/ncsn/celeba.py", "ve/ncsn/celeba_124.py", "ve/ncsn/celeba_1245.py", "ve/ncsn/celeba_5.py",
    "ve/ncsn/cifar10.py", "ve/ncsn/cifar10_124.py", "ve/ncsn/cifar10_1245.py", "ve/ncsn/cifar10_5.py",
    "ve/ncsnv2/bedroom.py", "ve/ncsnv2/celeba.py", "ve/ncsnv2/cifar10.py",
    "vp/cifar10_ddpmpp.py", "vp/cifar10_ddpmpp_continuous.py", "vp/cifar10_ddpmpp_deep_continuous.py",
    "vp/cifar10_ncsnpp.py", "vp/cifar10_ncsnpp_continuous.py", "vp/cifar10_ncsnpp_deep_continuous.py",
    "vp/ddpm/bedroom.py", "vp/ddpm/celebahq.py", "vp/ddpm/church.py", "vp/ddpm/cifar10.py",
    "vp/ddpm/cifar10_continuous.py", "vp/ddpm/cifar10_unconditional.py",
}
BASES = ["default_cifar10_configs.py", "default_celeba_configs.py", "default_lsun_configs.py",
         "default_mnist_configs.py", "default_imagenet32_configs.py"]
MODEL_MODULES = ["ddpm", "ncsnpp", "ncsn", "ncsnv2"]

# Fields every config has (toy ones included), by section, with their types.
COMMON_FIELDS = {
    "training": dict(sde=str, continuous=bool, weighting=str, reduce_mean=bool, eps=float, batch_size=int,
                     n_iters=int, n_jitted_steps=int, log_freq=int, eval_freq=int, snapshot_freq=int,
                     snapshot_freq_for_preemption=int, max_to_keep=int, snapshot_sampling=bool),
    "sampling": dict(method=str, predictor=str, corrector=str, n_steps_each=int, snr=float, noise_removal=bool,
                     eps=float, num_samples=int, shard_size=int, ode_solver=str, ode_rtol=float, ode_atol=float, ode_steps=int,
                     ode_schedule=str, ode_rho=float),
    "eval": dict(batch_size=int, num_test=int, bpd_repeats=int, enable_bpd=bool, eps=float, exact_divergence=bool, rtol=float,
                 atol=float, begin_ckpt=int, end_ckpt=int),
    "data": dict(dataset=str),
    "model": dict(name=str, nf=int, embedding_type=str, scale_by_sigma=bool, dropout=float, ema_rate=float,
                  sigma_min=float, sigma_max=float, beta_min=float, beta_max=float, num_scales=int),
    "optim": dict(optimizer=str, lr=float, beta1=float, eps=float, weight_decay=float, warmup=int,
                  grad_clip=float),
}
# Further fields of the image configs: the score-SDE reference's, and the sample-quality settings (SPEC §8).
IMAGE_FIELDS = {
    "sampling": dict(probability_flow=bool),
    "eval": dict(enable_sampling=bool, enable_loss=bool, num_samples=int, bpd_dataset=str, enable_sample_quality=bool,
                 sample_quality_features=str, inception_preprocessing=str, kid_subsets=int, kid_subset_size=int,
                 is_splits=int),
    "data": dict(image_size=int, num_channels=int, random_flip=bool, centered=bool, uniform_dequantization=bool),
    "model": dict(normalization=str, nonlinearity=str),
}


def _experiment_paths():
    """configs/**/*.py defining get_config, without packages and bases, as paths relative to configs/."""
    paths = []
    for path in sorted(CONFIG_DIR.rglob("*.py")):
        if path.name == "__init__.py" or path.name.startswith("default_"):
            continue
        if "def get_config" in path.read_text():
            paths.append(path.relative_to(CONFIG_DIR).as_posix())
    return paths


EXPERIMENTS = _experiment_paths()


@functools.lru_cache(maxsize=None)
def _module(rel):
    spec = importlib.util.spec_from_file_location("config_" + rel.replace("/", "_")[:-3], CONFIG_DIR / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(rel):
    return _module(rel).get_config()


IMAGE_EXPERIMENTS = [rel for rel in EXPERIMENTS if "image_size" in load(rel).data]


def _check_fields(config, fields, rel):
    for section, types in fields.items():
        for key, kind in types.items():
            assert key in config[section], f"{rel}: missing {section}.{key}"
            value = config[section][key]
            assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), \
                f"{rel}: {section}.{key} = {value!r} is not a {kind.__name__}"


def test_the_reference_tree_is_covered():
    """Every score-SDE experiment file exists under the same path, with the bases and the recommended VP setup."""
    missing = REFERENCE_EXPERIMENTS - set(EXPERIMENTS)
    assert not missing, f"reference configs without a counterpart: {sorted(missing)}"
    assert "vp/cifar10.py" in EXPERIMENTS
    for base in BASES:
        assert (CONFIG_DIR / base).exists(), base


@pytest.mark.parametrize("rel", EXPERIMENTS)
def test_fields_types_and_names(rel):
    """The documented fields exist with their types; the SDE, weighting, sampler, predictor and corrector are
    names the code registers (each lookup raises ValueError otherwise)."""
    config = load(rel)
    _check_fields(config, COMMON_FIELDS, rel)
    assert isinstance(config.seed, int)
    sde_lib.get_sde(config)
    losses.get_weighting(config.training.weighting)
    sampling.get_method(config.sampling.method)
    sampling.get_predictor(config.sampling.predictor)
    sampling.get_corrector(config.sampling.corrector)
    assert 0.0 < config.training.eps < 1.0 and 0.0 < config.sampling.eps < 1.0 and 0.0 < config.eval.eps < 1.0
    assert 0.0 <= config.model.ema_rate < 1.0
    assert config.model.sigma_min < config.model.sigma_max and config.model.beta_min < config.model.beta_max


@pytest.mark.parametrize("rel", EXPERIMENTS)
def test_frequencies_and_checkpoint_range(rel):
    """Logging, eval and checkpoints happen on multiples of n_jitted_steps; eval sweeps only checkpoints the run
    writes (n_iters // snapshot_freq of them) and keeps."""
    t, e = load(rel).training, load(rel).eval
    for name in ("log_freq", "eval_freq", "snapshot_freq", "snapshot_freq_for_preemption"):
        assert t[name] % t.n_jitted_steps == 0, f"{rel}: training.{name} is not a multiple of n_jitted_steps"
    written = t.n_iters // t.snapshot_freq
    if e.end_ckpt < 0:  # the newest checkpoint, whatever its number
        return
    assert 1 <= e.begin_ckpt <= e.end_ckpt <= written, f"{rel}: eval ckpts {e.begin_ckpt}..{e.end_ckpt} of {written}"
    assert t.max_to_keep >= e.end_ckpt


@pytest.mark.parametrize("rel", EXPERIMENTS)
def test_passes_the_run_validation(rel):
    """What main.py checks before any mode: every shipped experiment must get past it unmodified."""
    run_lib.validate_config(load(rel))


@pytest.mark.parametrize("rel", IMAGE_EXPERIMENTS)
def test_image_config_conventions(rel):
    """The score-SDE conventions: VP / sub-VP data centered to [-1, 1] and sampled down to eps 1e-3, VE data in
    [0, 1] down to 1e-5; the Fourier embedding (of log σ) only for continuous VE; resolutions reachable."""
    config = load(rel)
    _check_fields(config, IMAGE_FIELDS, rel)
    ve = config.training.sde == "vesde"
    assert config.data.centered == (not ve)
    assert config.sampling.eps == SEED001_SAMPLING_EPS.get(rel, 1e-5 if ve else 1e-3)
    if rel in REFERENCE_EXPERIMENTS:  # the demo trades likelihood-ODE accuracy for minutes on a CPU
        assert config.eval.eps == 1e-5 and config.eval.rtol == 1e-5 and config.eval.atol == 1e-5
    assert not config.eval.exact_divergence
    if config.model.name == "ncsnpp" and config.model.embedding_type == "fourier":
        assert ve and config.training.continuous, f"{rel}: Fourier features of log σ need continuous VE labels"
    m, size = config.model, config.data.image_size
    if "ch_mult" in m:
        levels = len(m.ch_mult)
        assert size % 2 ** (levels - 1) == 0
        reachable = {size // 2**k for k in range(levels)}
        assert set(m.attn_resolutions) <= reachable, f"{rel}: attention at {m.attn_resolutions}, sizes {reachable}"


# Values transcribed from the reference files (a typo here is what this test catches).
REFERENCE_VALUES = {
    "ve/cifar10_ncsnpp_continuous.py": {"model.sigma_max": 50.0, "model.num_res_blocks": 4, "model.fir": True,
                                        "model.progressive_input": "residual", "model.ema_rate": 0.999,
                                        "model.embedding_type": "fourier", "sampling.snr": 0.16,
                                        "training.n_iters": 1300001, "training.reduce_mean": False},
    "ve/cifar10_ncsnpp_deep_continuous.py": {"model.num_res_blocks": 8, "training.n_iters": 950001},
    "vp/cifar10_ddpmpp_continuous.py": {"model.fir": False, "model.progressive_input": "none",
                                        "model.ema_rate": 0.9999, "model.embedding_type": "positional",
                                        "training.reduce_mean": True, "sampling.predictor": "euler_maruyama"},
    "vp/cifar10_ddpmpp.py": {"training.continuous": False, "sampling.predictor": "ancestral"},
    "vp/ddpm/cifar10_unconditional.py": {"model.conditional": False, "model.num_res_blocks": 2},
    "vp/ddpm/church.py": {"model.ch_mult": (1, 1, 2, 2, 4, 4), "optim.lr": 2e-5, "model.num_scales": 1000,
                          "data.category": "church_outdoor"},
    "ve/church_ncsnpp_continuous.py": {"model.sigma_max": 380.0, "model.num_scales": 2000, "sampling.snr": 0.075,
                                       "model.ch_mult": (1, 1, 2, 2, 2, 2, 2), "model.progressive": "output_skip"},
    "ve/bedroom_ncsnpp_continuous.py": {"model.sigma_max": 378.0, "data.category": "bedroom"},
    "ve/ffhq_256_ncsnpp_continuous.py": {"model.sigma_max": 348.0, "data.dataset": "FFHQ"},
    "ve/ffhq_ncsnpp_continuous.py": {"model.sigma_max": 1348.0, "model.nf": 16, "training.batch_size": 8,
                                     "model.ch_mult": (1, 2, 4, 8, 16, 32, 32, 32), "data.image_size": 1024,
                                     "training.n_jitted_steps": 2, "training.reduce_mean": True},
    "ve/celebahq_ncsnpp_continuous.py": {"training.n_jitted_steps": 1, "training.reduce_mean": False},
    "ve/celeba_ncsnpp.py": {"model.sigma_max": 90.0, "data.image_size": 64, "sampling.snr": 0.17},
    "ve/ncsn/cifar10.py": {"model.sigma_max": 1.0, "model.num_scales": 10, "sampling.n_steps_each": 100,
                           "model.ema_rate": 0.0, "optim.lr": 1e-3, "optim.grad_clip": -1.0},
    "ve/ncsn/cifar10_1245.py": {"model.num_scales": 232, "model.ema_rate": 0.999, "sampling.snr": 0.176},
    # ermongroup/ncsn configs/anneal.yml (MNIST block) and runners/anneal_runner.py (its sampler).
    "ve/ncsn/mnist.py": {"training.batch_size": 128, "training.n_iters": 200001, "model.sigma_max": 1.0,
                         "model.sigma_min": 0.01, "model.num_scales": 10, "model.nf": 64, "optim.lr": 1e-3,
                         "optim.weight_decay": 0.0, "data.random_flip": False, "sampling.method": "ald",
                         "sampling.step_lr": 2e-5, "sampling.n_steps_each": 100, "sampling.noise_removal": False,
                         "sampling.ald_init": "uniform"},
    "ve/ncsn/celeba_124.py": {"model.num_scales": 500, "model.sigma_max": 90.0, "sampling.snr": 0.128},
    "ve/ncsnv2/bedroom.py": {"model.name": "ncsnv2_128", "model.num_scales": 1086, "model.sigma_max": 190.0,
                             "data.image_size": 128, "training.batch_size": 128, "training.continuous": False},
    "ve/ncsnv2/celeba.py": {"model.name": "ncsnv2_64", "model.scale_by_sigma": True, "optim.lr": 1e-4},
    "subvp/cifar10_ddpmpp_deep_continuous.py": {"training.sde": "subvpsde", "model.num_res_blocks": 8},
}


@pytest.mark.parametrize("rel", sorted(REFERENCE_VALUES))
def test_reference_hyperparameters(rel):
    config = load(rel)
    for dotted, expected in REFERENCE_VALUES[rel].items():
        section, key = dotted.split(".")
        assert config[section][key] == expected, f"{rel}: {dotted} = {config[section][key]!r}, expected {expected!r}"


# Seed 001's experiments (Song, Durkan, Murray & Ermon 2021) with yang-song/score_flow's values: SDE, residual blocks
# per resolution, dataset, the truncation eps of training and likelihood, and σ_eps to the two digits each file's
# comment states. score_flow's sub-VP files also sample down to 1e-2 (score-SDE: 1e-3).
SEED001 = {
    "vp/cifar10_ddpmpp_likelihood.py": ("vpsde", 4, "CIFAR10", 1e-5, 1.0e-3),
    "vp/cifar10_ddpmpp_deep_likelihood.py": ("vpsde", 8, "CIFAR10", 1e-5, 1.0e-3),
    "vp/imagenet32_ddpmpp_likelihood.py": ("vpsde", 4, "IMAGENET32", 5e-5, 2.2e-3),
    "vp/imagenet32_ddpmpp_deep_likelihood.py": ("vpsde", 8, "IMAGENET32", 5e-5, 2.2e-3),
    "subvp/cifar10_ddpmpp_likelihood.py": ("subvpsde", 4, "CIFAR10", 1e-2, 2.0e-3),
    "subvp/cifar10_ddpmpp_deep_likelihood.py": ("subvpsde", 8, "CIFAR10", 1e-2, 2.0e-3),
    "subvp/imagenet32_ddpmpp_likelihood.py": ("subvpsde", 4, "IMAGENET32", 1e-2, 2.0e-3),
    "subvp/imagenet32_ddpmpp_deep_likelihood.py": ("subvpsde", 8, "IMAGENET32", 1e-2, 2.0e-3),
}
SEED001_SAMPLING_EPS = {rel: 1e-2 for rel, (sde, *_) in SEED001.items() if sde == "subvpsde"}


@pytest.mark.parametrize("rel", sorted(SEED001))
def test_seed001_hyperparameters(rel):
    """Likelihood weighting with importance sampling from eps, the likelihood measured from the same eps, the
    ODE sampler, the last checkpoint only, score_flow's training length, optimizer, EMA and per-dataset data and
    evaluation settings, and its variational-dequantization settings."""
    config = load(rel)
    sde, blocks, dataset, eps, _ = SEED001[rel]
    t, e, d, m, o = config.training, config.eval, config.data, config.model, config.optim
    assert (t.sde, t.weighting, t.continuous, t.reduce_mean) == (sde, "likelihood_importance", True, True)
    assert t.eps == eps and e.eps == eps
    assert m.num_res_blocks == blocks and t.n_iters == {4: 1300001, 8: 950001}[blocks]
    assert e.begin_ckpt == e.end_ckpt == t.n_iters // t.snapshot_freq == {4: 26, 8: 19}[blocks]
    assert (t.batch_size, o.lr, o.warmup, o.grad_clip, m.ema_rate) == (128, 2e-4, 5000, 1.0, 0.9999)
    assert config.sampling.method == "ode" and e.enable_bpd and not e.enable_loss
    cifar = dataset == "CIFAR10"
    assert (d.dataset, d.random_flip, d.centered) == (dataset, False, True)
    assert (m.dropout, e.bpd_repeats, e.num_test) == ((0.1, 5, 10000) if cifar else (0.0, 1, 50000))
    q = config.dequantizer   # score_flow's config.deq: 300k steps of batch 128, lr 2e-4, 4 couplings of 96 filters
    assert (q.num_steps, q.batch_size, q.lr, q.num_couplings, q.features) == (300000, 128, 2e-4, 4, 96)


@pytest.mark.parametrize("rel", sorted(SEED001))
def test_seed001_network_is_the_score_sde_baseline(rel):
    """The paper compares objectives on one network: each file's model section equals the score-SDE config of the
    same SDE and depth (vp/cifar10_ddpmpp_deep_continuous, ...) but for the dropout of ImageNet's base."""
    baseline = load(rel.replace("imagenet32", "cifar10").replace("_likelihood", "_continuous")).model.to_dict()
    model = load(rel).model.to_dict()
    assert {**model, "dropout": baseline["dropout"]} == baseline


@pytest.mark.parametrize("rel", sorted(SEED001))
def test_seed001_truncation_noise_level(rel):
    """σ_eps, the smallest noise level trained and integrated, is the value each file's comment states (to its two
    digits: rtol 3%) and under a third of the 8-bit bin width 2/256 of [-1, 1]: VP σ² = 1 - exp(-B(t)), sub-VP
    σ = 1 - exp(-B(t)), B(t) = β_min t + ½ (β_max - β_min) t² (SPEC §1), in float64 here."""
    config = load(rel)
    sde, _, _, eps, stated = SEED001[rel]
    b = config.model.beta_min * eps + 0.5 * (config.model.beta_max - config.model.beta_min) * eps**2
    sigma = -np.expm1(-b) if sde == "subvpsde" else np.sqrt(-np.expm1(-b))
    np.testing.assert_allclose(float(sde_lib.get_sde(config).marginal_std(jnp.asarray(eps))), sigma, rtol=1e-5)
    np.testing.assert_allclose(sigma, stated, rtol=0.03)
    assert sigma < (2 / 256) / 3


def test_seed001_docstrings_name_the_published_numbers():
    for rel in SEED001:
        doc = " ".join(_module(rel).__doc__.split())
        assert "2.83" in doc and "3.76" in doc and "variational dequantization" in doc, rel
        if "cifar10" in rel:  # the uniform-dequantization NLL of the λ = σ² baseline (score-SDE paper, Table 2)
            baseline = {"vp": {4: "3.16", 8: "3.13"}, "subvp": {4: "3.02", 8: "2.99"}}[rel.split("/")[0]]
            assert f"below the {baseline[SEED001[rel][1]]} of the same network" in doc, rel


@pytest.mark.parametrize("rel", [rel for rel in EXPERIMENTS if "step_lr" in load(rel).sampling])
def test_annealed_langevin_step_matches_the_snr(rel):
    """NCSN's step α_i = ε σ_i²/σ_min² equals the "ald" corrector's 2 (r σ_i)² iff ε = 2 (r σ_min)² (SPEC §6-7).

    Tolerance 1%: the published ε are quoted to two significant digits (2e-5, 6.2e-6, 3.3e-6, 1.8e-6)."""
    s, m = load(rel).sampling, load(rel).model
    np.testing.assert_allclose(s.step_lr, 2 * (s.snr * m.sigma_min) ** 2, rtol=0.01)


@pytest.mark.parametrize("rel", IMAGE_EXPERIMENTS)
def test_docstring_gives_command_result_and_cost(rel):
    doc = _module(rel).__doc__
    assert f"python main.py --config=configs/{rel} --workdir=runs/" in doc and "--mode=train" in doc
    assert "Expected:" in doc and "Cost:" in doc


def test_the_design_card_command_loads_with_overrides(monkeypatch):
    """`--config=configs/vp/cifar10_ddpmpp_continuous.py` through ml_collections' flag, as main.py takes it."""
    monkeypatch.chdir(ROOT)
    argv = ["main.py", "--config=configs/vp/cifar10_ddpmpp_continuous.py", "--config.training.weighting=likelihood",
            "--config.training.n_iters=10"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.training.weighting == "likelihood" and config.training.n_iters == 10
    assert config.model.name == "ncsnpp" and config.training.sde == "vpsde"


def _flatten(config):
    return {f"{section}.{key}": value for section, fields in config.items() if hasattr(fields, "items")
            for key, value in fields.items()}


def test_recommended_vp_setup_is_ddpmpp_continuous_with_likelihood_training():
    base, recommended = _flatten(load("vp/cifar10_ddpmpp_continuous.py")), _flatten(load("vp/cifar10.py"))
    changed = {key for key in base if base[key] != recommended[key]}
    assert changed == {"training.weighting", "eval.enable_bpd"} and base.keys() == recommended.keys()
    assert recommended["training.weighting"] == "likelihood_importance" and recommended["eval.enable_bpd"]


@pytest.mark.parametrize("rel", EXPERIMENTS)
def test_smoke_shrinks_a_copy_and_keeps_the_experiment(rel):
    config = load(rel)
    before = config.to_dict()
    small = configs.smoke(config)
    assert config.to_dict() == before, "smoke modified its input"
    assert small.training.batch_size == 8 and small.training.n_iters == 4 and small.model.num_scales == 50
    assert small.training.n_iters // small.training.snapshot_freq >= small.eval.end_ckpt
    if small.training.sde != "vesde":
        assert small.model.beta_max / small.model.num_scales < 1.0, "DDPM's largest β_i = β_max / N must be < 1"
    if "dequantizer" in config:
        assert small.dequantizer.num_steps == 4 and small.dequantizer.batch_size == 8
    if "image_size" in config.data:
        assert small.data.image_size == 16 and small.model.nf == 32
    else:
        assert "image_size" not in small.data
    for dotted in ("training.sde", "training.continuous", "training.weighting", "model.name",
                   "model.embedding_type", "sampling.method", "sampling.predictor", "sampling.corrector"):
        section, key = dotted.split(".")
        assert small[section][key] == config[section][key]


# --- Networks (skipped while a model is not registered) ---

def _register_model_modules():
    """Import the image-model modules that exist so far (models/__init__ may not import them yet)."""
    for name in MODEL_MODULES:
        try:
            importlib.import_module(f"models.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"models.{name}":
                raise


def _model_or_skip(config):
    _register_model_modules()
    try:
        return models.create_model(config)
    except ValueError as error:
        if f"unknown model {config.model.name!r}" in str(error):
            pytest.skip(f"model {config.model.name!r} is not registered yet")
        raise


def _inputs(config, batch):
    """Zeros [B, H, W, C] and the labels the SDE gives a network at t = 0.5 (σ_t, 999 t or a level index)."""
    sde = sde_lib.get_sde(config)
    size, channels = config.data.image_size, config.data.num_channels
    t = jnp.full((batch,), 0.5)
    return sde, jnp.zeros((batch, size, size, channels)), sde.noise_labels(t, config.training.continuous), t


# Fields that change neither a network's structure nor its parameter shapes.
_SHAPE_FREE_FIELDS = {"ema_rate", "dropout", "sigma_min", "sigma_max", "beta_min", "beta_max", "scale_by_sigma",
                      "nonlinearity"}


def _network_key(config):
    """Configs with equal keys build the same network (the labels' dtype follows training.continuous)."""
    fields = {k: v for k, v in config.model.to_dict().items() if k not in _SHAPE_FREE_FIELDS}
    return repr((sorted(fields.items()), config.data.image_size, config.data.num_channels, config.training.continuous))


def _one_config_per_network(transform, fast):
    """One config per distinct network (a member of `fast` where the group has one); the others marked slow."""
    groups = {}
    for rel in IMAGE_EXPERIMENTS:
        groups.setdefault(_network_key(transform(load(rel))), []).append(rel)
    chosen = [next((rel for rel in group if rel in fast), group[0]) for group in groups.values()]
    return [pytest.param(rel, marks=() if rel in fast else pytest.mark.slow) for rel in sorted(chosen)]


# The fast subset: each model family at each kind of resolution, the design card's config and the DDPM counts.
FAST_FULL_SIZE = {"vp/ddpm/cifar10.py", "vp/ddpm/church.py", "vp/cifar10_ddpmpp_continuous.py",
                  "ve/cifar10_ncsnpp_continuous.py", "ve/church_ncsnpp_continuous.py", "ve/ffhq_ncsnpp_continuous.py",
                  "ve/ncsn/cifar10.py", "ve/ncsnv2/cifar10.py", "ve/ncsnv2/bedroom.py", "vp/mnist_ddpmpp_continuous.py"}
FAST_SMOKE = {"vp/cifar10_ddpmpp_continuous.py"}
_SHAPES = {}


def _full_size_shapes(config):
    """(output shape, parameter count) of the full-size network, traced once (jax.eval_shape: nothing is run)."""
    key = _network_key(config)
    if key not in _SHAPES:
        model = _model_or_skip(config)
        _, x, labels, _ = _inputs(config, 1)
        rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
        out, variables = jax.eval_shape(lambda: model.init_with_output(rngs, x, labels, train=False))
        n_params = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables["params"]))
        _SHAPES[key] = out.shape, n_params
    return _SHAPES[key]


@pytest.mark.parametrize("rel", _one_config_per_network(lambda config: config, FAST_FULL_SIZE))
def test_full_size_network_shapes(rel):
    """models.create_model(config) maps [1, H, W, C] and its labels [1] to [1, H, W, C] (an energy network: [1])."""
    config = load(rel)
    shape, n_params = _full_size_shapes(config)
    size, channels = config.data.image_size, config.data.num_channels
    assert shape == ((1,) if config.model.name.startswith("energy") else (1, size, size, channels))
    assert n_params > 0


def _attention_params(channels):
    """A DDPM self-attention block: GroupNorm (2C) and four 1x1 projections (C² + C each)."""
    return 2 * channels + 4 * (channels**2 + channels)


@pytest.mark.parametrize("rel, published, attn_channels", [
    ("vp/ddpm/cifar10.py", 35.7e6, 256),
    ("vp/ddpm/church.py", 114e6, 512),
])
def test_ddpm_parameter_count_matches_ho_et_al(rel, published, attn_channels):
    """Ho et al. (2020) report 35.7M (CIFAR-10) and 114M (LSUN) parameters. The score-SDE port applies attention
    once per level on the upsampling path, two 16x16 attention blocks fewer than DDPM; adding them back must give
    the published count to its rounding (± half a unit of its last digit)."""
    _, n_params = _full_size_shapes(load(rel))
    half_unit = 0.05e6 if published < 100e6 else 0.5e6
    assert abs(n_params + 2 * _attention_params(attn_channels) - published) <= half_unit


@pytest.mark.parametrize("rel", _one_config_per_network(configs.smoke, FAST_SMOKE))
def test_smoke_network_runs_and_gives_a_finite_score(rel):
    """The smoke variant of each distinct network initializes and, through models.get_score_fn, gives a finite
    score of the input's shape at the first and the last sampling time (t = sampling.eps and t = 1)."""
    config = configs.smoke(load(rel))
    model = _model_or_skip(config)
    sde, x, labels, _ = _inputs(config, 2)
    x = x + 0.1
    # An "rbg" key: op-by-op initialization, which dominates this test's time, compiles ~2x faster than threefry's.
    variables = model.init({"params": jax.random.key(0, impl="rbg")}, x, labels, train=False)
    t = jnp.array([config.sampling.eps, 1.0])
    score = models.get_score_fn(sde, model, variables, continuous=config.training.continuous)(x, t)
    assert score.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(score)))
