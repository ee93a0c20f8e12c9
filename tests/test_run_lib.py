"""The train / eval / sample loops: config validation, checkpoints and exact resume, a refused checkpoint of
another model, the NaN stop, data parallelism on 8 devices, and a short training run whose test NLL reaches the
entropy of the true mixture (SPEC §9)."""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import datasets
import run_lib
import sampling
from configs.default_toy_configs import get_default_configs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config():
    """A two-component mixture and a one-block MLP: 8 steps, checkpoints at 4 (meta) and 8 (permanent)."""
    config = get_default_configs()
    data = config.data
    data.dataset = "gmm"
    data.gmm_weights, data.gmm_means, data.gmm_stds = [0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [0.5, 0.5]
    model = config.model
    model.nf, model.num_layers, model.num_scales = 16, 1, 25
    t = config.training
    t.batch_size, t.n_iters, t.log_freq, t.eval_freq = 32, 8, 4, 4
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.snapshot_sampling = 8, 4, False
    config.eval.num_test, config.eval.batch_size = 64, 32
    config.eval.begin_ckpt = config.eval.end_ckpt = 1
    config.sampling.num_samples = 64
    return config


def saved_arrays(workdir, step, folder="checkpoints"):
    """The TrainState saved at `step` as a flat list of numpy arrays, read without a target tree."""
    tree = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(workdir), folder, str(step), "default"))
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def file_hashes(workdir):
    """{relative path: sha256} of every file under the workdir's checkpoint folders and config.json."""
    root = pathlib.Path(workdir)
    files = [root / "config.json"] + [p for d in ("checkpoints", "checkpoints-meta") for p in (root / d).rglob("*")]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    run_lib.train(tiny_config(), str(workdir))
    return workdir


# --- Validation. ---

def _override(key, value, **more):
    config = tiny_config()
    for k, v in {key: value, **more}.items():
        section, name = k.split(".")
        config[section][name] = v
    return config


BAD_VALUES = [
    ("training.batch_size", -4, {}, r"config.training.batch_size must be > 0, got -4"),
    ("training.n_iters", -1, {}, r"config.training.n_iters must be >= 0"),
    ("training.eps", 0.0, {}, r"config.training.eps must lie in \(0, T\) = \(0, 1.0\), got 0.0"),
    ("training.eps", 1.5, {}, r"config.training.eps must lie in \(0, T\)"),
    ("sampling.eps", 1.0, {}, r"config.sampling.eps must lie in \(0, T\)"),
    ("eval.eps", -1e-5, {}, r"config.eval.eps must lie in \(0, T\)"),
    ("model.ema_rate", 1.0, {}, r"config.model.ema_rate must be in \[0, 1\)"),
    ("training.sde", "vesd", {}, r"unknown SDE 'vesd'"),
    ("training.weighting", "uniform", {}, r"unknown DSM weighting 'uniform'"),
    ("sampling.method", "ddim", {}, r"config.sampling.method: unknown sampling method 'ddim'"),
    ("sampling.predictor", "heun", {}, r"config.sampling.predictor: unknown predictor 'heun'"),
    ("model.name", "unet", {}, r"unknown model 'unet'"),
    ("optim.optimizer", "sgd", {}, r"unknown optimizer 'sgd'"),
    ("training.n_jitted_steps", 3, {}, r"config.training.log_freq = 4 must be a multiple of"),
    ("model.sigma_max", 0.001, {"training.sde": "vesde"}, r"need 0 < sigma_min < sigma_max"),
]


@pytest.mark.parametrize("key, value, more, message", BAD_VALUES, ids=[f"{b[0]}={b[1]}" for b in BAD_VALUES])
def test_validate_config_rejects_with_one_line(key, value, more, message):
    with pytest.raises(ValueError, match=message) as info:
        run_lib.validate_config(_override(key, value, **more))
    assert "\n" not in str(info.value)


def test_the_tiny_and_toy_configs_validate():
    run_lib.validate_config(tiny_config())
    for path in sorted((ROOT / "configs" / "toy").glob("[!_]*.py")):
        namespace = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        run_lib.validate_config(namespace["get_config"]())


def test_unwritable_workdir_fails_before_anything_runs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=f"cannot write to {blocker}/sub: Not a directory"):
        run_lib.train(tiny_config(), str(blocker / "sub"))
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="cannot write to .*locked: Permission denied"):
        run_lib.train(tiny_config(), str(locked))


# --- Training outputs, resume, refusal, NaN. ---

def test_training_writes_checkpoints_metrics_and_config(trained):
    assert sorted(os.listdir(trained / "checkpoints")) == ["8"]
    assert sorted(os.listdir(trained / "checkpoints-meta")) == ["4"]
    assert json.loads((trained / "config.json").read_text()) == json.loads(tiny_config().to_json())
    records = run_lib.read_metrics(trained / "metrics.jsonl")
    assert [r["step"] for r in records] == [4, 8]
    assert all({"train_loss", "grad_norm", "steps_per_sec", "eval_loss"} <= r.keys() for r in records)
    assert all(np.isfinite(r["train_loss"]) and r["steps_per_sec"] > 0 for r in records)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(trained / "tb"))
    assert saved_arrays(trained, 8)[-1] == 8  # TrainState.step is the last leaf (fields in sorted order)


def test_resume_ends_bit_identical_to_an_uninterrupted_run(trained, tmp_path):
    """4 steps, stop, 4 more from the checkpoint == 8 steps in one go, exactly (np.array_equal on every array)."""
    config = tiny_config()
    config.training.n_iters = 4
    run_lib.train(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
    run_lib.train(tiny_config(), str(tmp_path))
    resumed, straight = saved_arrays(tmp_path, 8), saved_arrays(trained, 8)
    assert len(resumed) == len(straight) > 10
    assert all(np.array_equal(a, b) for a, b in zip(resumed, straight))
    # Not vacuous: training changed the parameters.
    assert not all(np.array_equal(a, b) for a, b in zip(resumed, saved_arrays(tmp_path, 4)))


def test_a_checkpoint_from_before_the_objective_state_field_restores(trained, tmp_path):
    """Checkpoints written before TrainState had objective_state (a dict of step, params, opt_state, ema_params)
    restore into today's TrainState with objective_state None, every array equal."""
    config = tiny_config()
    old = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(trained), "checkpoints", "8", "default"))
    old = {name: old[name] for name in ("step", "params", "opt_state", "ema_params")}
    permanent, meta = run_lib.checkpoint_managers(str(tmp_path), config)
    permanent.save(8, args=ocp.args.StandardSave(old))
    for manager in (permanent, meta):
        manager.wait_until_finished()
        manager.close()
    assert "objective_state" not in ocp.StandardCheckpointer().metadata(
        os.path.join(str(tmp_path), "checkpoints", "8", "default")).item_metadata
    state, step = run_lib.restore_latest(str(tmp_path), config, run_lib.Setup(config))
    assert step == 8 and state.objective_state is None
    for name in old:
        got, want = jax.tree.leaves(getattr(state, name)), jax.tree.leaves(old[name])
        assert len(got) == len(want) > 0 and all(np.array_equal(a, b) for a, b in zip(got, want)), name


def pcd_config(n_iters=8):
    """tiny_config with an energy MLP trained by persistent CD: a 64-chain replay buffer in the TrainState."""
    config = tiny_config()
    config.model.name, config.model.energy_quadratic = "energy_mlp", 0.1
    config.training.objective, config.training.n_iters = "ebm_pcd", n_iters
    config.training.ebm = ml_collections.ConfigDict(dict(langevin_steps=2, step_size=0.2, buffer_size=64,
                                                         chain_init="prior"))
    config.sampling.method, config.sampling.langevin_init, config.sampling.num_samples = "langevin", "prior", 16
    return config


def test_persistent_cd_resumes_its_replay_buffer_bit_identical(tmp_path):
    """The replay buffer is checkpointed with the parameters: 4 + 4 steps == 8 steps on every array, the buffer
    included, and it moved between the checkpoints; --mode=sample draws Langevin samples of the energy."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_lib.train(pcd_config(), str(straight))
    run_lib.train(pcd_config(n_iters=4), str(resumed))
    run_lib.train(pcd_config(), str(resumed))
    a, b = saved_arrays(straight, 8), saved_arrays(resumed, 8)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    buffers = [leaf for leaf in (saved_arrays(straight, 8), saved_arrays(straight, 4, "checkpoints-meta"))
               for leaf in leaf if leaf.shape == (64, 2)]
    assert len(buffers) == 2 and not np.array_equal(*buffers)
    samples = run_lib.sample(pcd_config(), str(straight))
    assert samples.shape == (16, 2) and np.isfinite(samples).all()


def test_checkpoint_of_another_model_is_refused_and_left_untouched(trained):
    before = file_hashes(trained)
    config = tiny_config()
    config.model.nf = 32
    with pytest.raises(ValueError, match=f"checkpoint in {trained} was made by a different model: parameter "
                                         r"Dense_\d+/\w+ has shape .* in the checkpoint but .* in the config's "
                                         "model; use a new --workdir"):
        run_lib.train(config, str(trained))
    assert file_hashes(trained) == before


def test_nonfinite_loss_stops_naming_the_step_and_keeps_checkpoints(trained, tmp_path):
    """Resume to 12 steps on data at 1e30 (same model): the loss of step 9 overflows to inf."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = file_hashes(workdir)
    config = tiny_config()
    config.training.n_iters = 12
    config.data.gmm_means = [[1e30, 0.0], [1e30, 0.0]]
    with pytest.raises(run_lib.NonFiniteLossError, match=r"not finite at step 9 .*lower the learning rate"):
        run_lib.train(config, str(workdir))
    assert file_hashes(workdir) == before


def test_sample_mode_writes_samples_and_plot(trained):
    samples = run_lib.sample(tiny_config(), str(trained))
    saved = np.load(trained / "samples" / "step_00000008" / "shard_00000.npz")
    np.testing.assert_array_equal(saved["samples"], samples)
    assert samples.shape == (64, 2) and np.isfinite(samples).all()
    assert int(saved["nfe"]) == 25  # Euler-Maruyama, no corrector: N = 25 NFE
    assert (trained / "samples" / "step_00000008.png").stat().st_size > 10_000


def test_shard_plan():
    assert run_lib.shard_plan(64, 1024) == (64, 1)
    assert run_lib.shard_plan(50_000, 1024) == (1024, 49)      # 50,176 drawn, the last 176 unused
    assert run_lib.shard_plan(100, 25) == (25, 4)


def test_sampling_in_shards_resumes_and_depends_only_on_seed_and_shard(trained, tmp_path, monkeypatch):
    """70 samples in shards of 32 (3 shards, 96 drawn): shard k is the sampler's output for fold_in(key, k), so
    the first two shards of a run asked for 64 samples are the same arrays. A rerun reads every finished shard
    (the sampler is not called); a missing or truncated shard is drawn again, equal to the first draw."""
    workdir = _copy(trained, tmp_path / "run")
    config = tiny_config()
    config.sampling.num_samples, config.sampling.shard_size = 70, 32
    samples = run_lib.sample(config, str(workdir))
    shards = sorted((workdir / "samples" / "step_00000008").iterdir())
    assert [p.name for p in shards] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    assert samples.shape == (70, 2)
    np.testing.assert_array_equal(samples, np.concatenate([np.load(p)["samples"] for p in shards])[:70])
    assert not np.array_equal(samples[:32], samples[32:64])

    config.sampling.num_samples = 64
    fewer = run_lib.sample(config, str(_copy(trained, tmp_path / "fewer")))
    np.testing.assert_array_equal(fewer, samples[:64])

    shards[1].unlink()
    shards[2].write_bytes(shards[2].read_bytes()[:100])     # a shard cut short (not a readable .npz)
    calls = []
    real = sampling.get_sampling_fn
    monkeypatch.setattr(sampling, "get_sampling_fn", lambda *a: _counted(real(*a), calls))
    config.sampling.num_samples = 70
    np.testing.assert_array_equal(run_lib.sample(config, str(workdir)), samples)
    assert len(calls) == 2                                  # shards 1 and 2 only
    calls.clear()
    run_lib.sample(config, str(workdir))
    assert calls == [] and not list(workdir.rglob("*.partial.npz"))
    config.sampling.snr = 0.2                               # another sampler setting: every shard is drawn again
    run_lib.sample(config, str(workdir))
    assert len(calls) == 3


def _copy(source, target):
    """A copy of a trained workdir without the samples and evaluations of other tests."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("samples", "eval"))
    return target


def _counted(fn, calls):
    def counted(*args):
        calls.append(1)
        return fn(*args)
    return counted


def test_padded_batches_wrap_around_to_equal_sizes():
    batches = run_lib._padded_batches(5, 2)
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3], [4, 0]]


def _records(workdir):
    return run_lib.read_metrics(workdir / "eval" / "metrics.jsonl")


def test_eval_resumes_from_its_saved_batches_and_reports_its_settings(trained, tmp_path, monkeypatch):
    """64 test points in batches of 24 (3 solves, the last padded) x 2 repeats with Hutchinson probes: 6 files.
    The repeats' probes differ (so do their NLLs); the reported NLL is the mean over examples of the repeats' mean.
    A rerun reads every file (the ODE solver is not called) and reports the same numbers; a deleted file is
    solved again to the same values."""
    import likelihood

    workdir = _copy(trained, tmp_path / "run")
    config = tiny_config()
    config.eval.batch_size, config.eval.bpd_repeats, config.eval.exact_divergence = 24, 2, False
    run_lib.evaluate(config, str(workdir))
    folder = workdir / "eval" / "step_00000008" / "nll"
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"r{r:03d}_b{b:05d}.npz" for r in range(2) for b in range(3)]
    nll = np.array([np.concatenate([np.load(folder / f"r{r:03d}_b{b:05d}.npz")["nll"] for b in range(3)])[:64]
                    for r in range(2)])
    assert not np.array_equal(nll[0], nll[1])                 # fresh probes (the tiny model is near-linear)
    (record,) = _records(workdir)
    assert record["test_nll"] == pytest.approx(nll.mean(), rel=1e-12)
    assert record["test_nll_se"] == pytest.approx(nll.mean(axis=0).std(ddof=1) / 8, rel=1e-9)
    assert (record["nll_examples"], record["nll_repeats"], record["nll_eps"], record["nll_rtol"]) == (
        64, 2, config.eval.eps, config.eval.rtol)

    def refuse(*args, **kwargs):
        raise AssertionError("a saved batch was solved again")

    monkeypatch.setattr(likelihood, "log_likelihood", refuse)
    run_lib.evaluate(config, str(workdir))
    monkeypatch.undo()
    (folder / "r001_b00001.npz").unlink()
    run_lib.evaluate(config, str(workdir))
    first, *reruns = _records(workdir)
    assert all(r["test_nll"] == first["test_nll"] for r in reruns)  # the re-solved batch: bit-identical
    # Other solver settings make other numbers: nothing saved under the old ones is reused.
    config.eval.rtol = config.eval.atol = 1e-3
    run_lib.evaluate(config, str(workdir))
    assert _records(workdir)[-1]["test_nll"] != first["test_nll"]
    assert all(str(np.load(p)["settings"]).count('"rtol": 0.001') == 1 for p in folder.iterdir())


def test_eval_reports_the_likelihood_bound_beside_the_ode_nll(trained, tmp_path):
    """enable_bound: seed 001's bound per test point saved in eval/step_8/bound (resumable like the NLL), reported
    as bound_nll ± se with its settings. Its mean over points from the data density is >= the density's entropy
    (SPEC §3) within error, and it matches likelihood_bound called directly with the key test_bound derives."""
    import likelihood

    workdir = _copy(trained, tmp_path / "run")
    config = tiny_config()
    config.eval.enable_bound, config.eval.bound_n_t = True, 32
    run_lib.evaluate(config, str(workdir))
    (record,) = _records(workdir)
    folder = workdir / "eval" / "step_00000008" / "bound"
    saved = np.concatenate([np.load(folder / f"r000_b{b:05d}.npz")["nll"] for b in range(2)])
    assert record["bound_nll"] == pytest.approx(saved.mean(), rel=1e-12)
    assert (record["bound_n_t"], record["bound_importance"], record["bound_eps"]) == (32, 1.0, config.eval.eps)
    assert record["bound_nll"] > record["entropy"] - 3 * (record["bound_nll_se"] + record["entropy_se"])
    setup = run_lib.Setup(config)
    state = run_lib.restore(run_lib.checkpoint_managers(str(workdir), config, create=False)[0], 8,
                            setup.initial_state, str(workdir))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(setup.rngs["eval"], 8), run_lib._BOUND), 0)
    direct, _ = likelihood.likelihood_bound(key, setup.sde, setup.score_fn(state.ema_params),
                                            jnp.asarray(setup.dataset.test_split(0)[:32]), n_t=32, eps=config.eval.eps,
                                            t_chunk=8)
    np.testing.assert_allclose(saved[:32], np.asarray(direct), rtol=1e-6)


def _trained_image_mlp(workdir, dataset, size, channels):
    """The VP image config on an embedded set with a one-block MLP, trained 2 steps into workdir (checkpoint at 2);
    reverse diffusion without a corrector on 25 steps."""
    from configs.vp import mnist_ddpmpp_continuous

    config = mnist_ddpmpp_continuous.get_config()
    config.data.dataset, config.data.image_size, config.data.num_channels = dataset, size, channels
    model = config.model
    model.name, model.nf, model.num_layers, model.num_scales = "mlp", 16, 1, 25
    t = config.training
    t.batch_size, t.n_iters, t.snapshot_freq, t.snapshot_sampling = 16, 2, 2, False
    config.sampling.corrector = "none"
    run_lib.train(config, str(workdir))
    return config


def test_inpaint_mode_keeps_the_known_pixels_and_draws_the_rest(tmp_path):
    """DIGITS 8x8 with a one-block MLP trained 2 steps: the inpaintings carry the known left half of each test
    image exactly (the sampler imposes it) and differ between draws on the hidden half; the PNG has one row per
    image of 2 + 4 tiles. An unknown mask name is a one-line error."""
    config = _trained_image_mlp(tmp_path, "DIGITS", 8, 1)
    x = run_lib.inpaint(config, str(tmp_path), "right_half", n_images=3, n_draws=4)
    test = datasets.get_dataset(config).test_data[:3]
    assert x.shape == (3, 4, 8, 8, 1)
    np.testing.assert_allclose(x[..., :4, :], np.broadcast_to(test[:, None, :, :4], (3, 4, 8, 4, 1)), atol=1e-6)
    assert np.all(np.std(x[..., 4:, :], axis=1).mean(axis=(1, 2, 3)) > 0.05)
    from PIL import Image
    png = Image.open(tmp_path / "samples" / "inpaint_right_half_step_00000002.png")
    assert png.size[0] > png.size[1] and abs(png.size[0] / png.size[1] - 6 / 3) < 0.1
    with pytest.raises(ValueError, match="unknown inpainting mask 'left'; choose one of"):
        run_lib.inpaint(config, str(tmp_path), "left")


def test_colorization_keeps_the_grey_image_and_draws_the_colour(tmp_path):
    """PHOTO_PATCHES (32x32 RGB) with a one-block MLP trained 2 steps, --inpaint_mask=colour: every draw has exactly
    the test patch's grey level (the mean of R, G, B; sampling.grey_projection) and the draws differ in colour.
    Grey data have no colour to draw: a one-line error."""
    config = _trained_image_mlp(tmp_path, "PHOTO_PATCHES", 32, 3)
    x = run_lib.inpaint(config, str(tmp_path), "colour", n_images=2, n_draws=3)
    test = datasets.get_dataset(config).test_data[:2]
    np.testing.assert_allclose(x.mean(axis=-1), np.broadcast_to(test.mean(axis=-1)[:, None], (2, 3, 32, 32)),
                               atol=1e-5)
    colour = x - x.mean(axis=-1, keepdims=True)
    assert np.abs(colour).mean() > 0.05 and np.abs(colour[:, 0] - colour[:, 1]).mean() > 0.05
    config.data.dataset, config.data.image_size, config.data.num_channels = "DIGITS", 8, 1
    with pytest.raises(ValueError, match="inpainting mask 'colour' needs RGB images; the data have 1 channel"):
        run_lib.inpaint(config, str(tmp_path), "colour")


def test_inpainting_masks_hide_what_they_say():
    right, bottom, centre, colour = (run_lib.INPAINT_MASKS[m][0](8, 8, 3)
                                     for m in ("right_half", "bottom_half", "centre", "colour"))
    assert right[:, :4].all() and not right[:, 4:].any()
    assert bottom[:4].all() and not bottom[4:].any()
    assert not centre[2:6, 2:6].any() and centre.sum() == 3 * (64 - 16)
    assert colour[..., 0].all() and not colour[..., 1:].any()     # the grey coordinate of COLOR_DECORRELATION


def test_eval_checkpoint_selection(trained):
    """score-SDE numbering: checkpoint k is step k · snapshot_freq; end_ckpt < 0 picks the newest checkpoint."""
    config = tiny_config()
    managers = run_lib.checkpoint_managers(str(trained), config, create=False)
    assert [s for s, _ in run_lib._eval_steps(config, managers)] == [8]
    config.eval.end_ckpt = -1
    assert [s for s, _ in run_lib._eval_steps(config, managers)] == [8]
    config.eval.begin_ckpt = config.eval.end_ckpt = 2
    with pytest.raises(ValueError, match=r"no checkpoint with step in \[16, 16\].*saved steps: \[8\]"):
        run_lib._eval_steps(config, managers)


def test_n_iters_need_not_divide_into_fused_steps(tmp_path):
    """As in the reference (n_iters 1,300,001 with 5 fused steps): training stops at the first multiple of
    n_jitted_steps >= n_iters, and that last state is a permanent checkpoint."""
    config = tiny_config()
    config.training.n_jitted_steps, config.training.n_iters = 2, 7
    run_lib.train(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["8"] and saved_arrays(tmp_path, 8)[-1] == 8


def test_image_grid_places_and_scales_each_image():
    """5 constant 2x3 images in (-1, 1) on a grid of ceil(√5) = 3 columns and 2 rows with 1-pixel white borders:
    value v maps to round(255 (v + 1) / 2)."""
    values = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    images = np.broadcast_to(values[:, None, None, None], (5, 2, 3, 1))
    grid = run_lib.image_grid(images, (-1.0, 1.0), pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1) and grid.dtype == np.uint8
    for i, v in enumerate(values):
        r, c = divmod(i, 3)
        tile = grid[1 + 3 * r:3 + 3 * r, 1 + 4 * c:4 + 4 * c, 0]
        assert tile.shape == (2, 3) and np.all(tile == round(255 * (v + 1) / 2))
    assert np.all(grid[4:6, 9:12] == 255)  # the sixth, empty cell stays white
    assert np.all(grid[0] == 255) and np.all(grid[:, 4] == 255)


def test_summary_counts_every_parameter_and_the_matmul_flops():
    """The MLP's forward FLOPs are 2 per multiply-add of its Dense kernels plus O(width) elementwise work; the
    parameter count is the sum over the listed shapes (and equals the initialized tree's)."""
    config = tiny_config()
    s = run_lib.summary(config)
    state = run_lib.Setup(config).initial_state
    assert s["params"] == sum(x.size for x in jax.tree.leaves(state.params)) == sum(
        int(np.prod(shape)) for shape in s["shapes"].values())
    matmul = 2 * sum(int(np.prod(shape)) for path, shape in s["shapes"].items() if path.endswith("kernel"))
    assert matmul <= s["flops_per_example"] < 1.2 * matmul
    assert s["input_shape"] == s["output_shape"] == (2,)


# --- Data parallelism. ---

_DEVICE_RUN = """
import json, sys, jax, ml_collections, run_lib
config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
run_lib.train(config, sys.argv[2])
run_lib.sample(config, sys.argv[3])
run_lib.evaluate(config, sys.argv[3])
config.training.batch_size = 12
try:
    run_lib.validate_config(config)
except ValueError as e:
    print(json.dumps({"devices": jax.device_count(), "error": str(e)}))
"""


def _train_losses(workdir):
    return np.array([r["train_loss"] for r in run_lib.read_metrics(pathlib.Path(workdir) / "metrics.jsonl")])


def _parallel_config():
    """tiny_config for the parallel runs: 12 logged steps of batch 64; 80 samples in shards of 40."""
    config = tiny_config()
    t = config.training
    t.batch_size, t.n_iters, t.log_freq = 64, 12, 1
    config.eval.batch_size = 64
    config.sampling.num_samples, config.sampling.shard_size = 80, 40
    return config


@pytest.mark.slow
def test_eight_devices_give_the_one_device_loss_trajectory(tmp_path):
    """12 steps with batch 64: one device in this process, 8 forced CPU devices in a subprocess (the XLA flag must
    precede jax's import). Tolerance 1e-5 relative: the sharded batch mean sums in another order (float32 rounding,
    ~1e-7 per step) and Adam carries the difference forward; a wrong sharding or rng would differ at O(1)."""
    config = _parallel_config()
    run_lib.train(config, str(tmp_path / "one"))
    shared = _copy(tmp_path / "one", tmp_path / "shared")     # sampled and evaluated on 8 devices
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _DEVICE_RUN, config.to_json(), str(tmp_path / "eight"),
                          str(shared)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert "config.training.batch_size = 12 must divide evenly over 8 devices" in report["error"]

    one, eight = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "eight")
    assert len(one) == len(eight) == 12
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    # Sampling and evaluation of the same checkpoint with the batch split over 8 devices: the same numbers up to
    # float rounding (the samples of a shard depend on its key, not on the devices).
    np.testing.assert_allclose(np.load(shared / "samples" / "step_00000012" / "shard_00001.npz")["samples"],
                               run_lib.sample(config, str(tmp_path / "one"))[40:], rtol=1e-5, atol=1e-5)
    run_lib.evaluate(config, str(tmp_path / "one"))
    assert _records(shared)[0]["test_nll"] == pytest.approx(_records(tmp_path / "one")[0]["test_nll"], rel=1e-5)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_hosts(config_file, workdir, mode):
    """main.py --mode=<mode> as 2 processes of 2 forced CPU devices each, joined by jax.distributed (gloo)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "main.py", f"--config={config_file}", f"--workdir={workdir}",
                               f"--mode={mode}", "--multihost", f"--coordinator_address={address}",
                               "--num_processes=2", f"--process_id={k}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_hosts_train_sample_and_evaluate_as_one(tmp_path):
    """main.py --multihost: 2 processes of 2 CPU devices each train 12 steps, sample and evaluate; every number
    equals the one-process, one-device run's up to float rounding (tolerance as for 8 devices: the global batch is
    the same, its mean sums in another order), and only process 0 writes metrics (12 lines, not 24)."""
    config = _parallel_config()
    config_file = tmp_path / "two_hosts_config.py"
    config_file.write_text(f"import json, ml_collections\n\ndef get_config():\n    return "
                           f"ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
    for mode in ("train", "sample", "eval"):
        _two_hosts(config_file, tmp_path / "two", mode)
    run_lib.train(config, str(tmp_path / "one"))

    one, two = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert len(one) == len(two) == 12
    np.testing.assert_allclose(two, one, rtol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "two" / "samples" / "step_00000012" / "shard_00001.npz")["samples"],
                               run_lib.sample(config, str(tmp_path / "one"))[40:], rtol=1e-5, atol=1e-5)
    run_lib.evaluate(config, str(tmp_path / "one"))
    assert _records(tmp_path / "two")[0]["test_nll"] == pytest.approx(_records(tmp_path / "one")[0]["test_nll"],
                                                                        rel=1e-5)

# --- A short training run reaches the true density (SPEC §9). ---

def nll_config():
    """A 3-component 2-D mixture; VP SDE, σ² weighting, a 2-block MLP, 600 Adam steps at batch 256."""
    config = get_default_configs()
    data = config.data
    data.dataset = "gmm"
    data.gmm_weights = [0.2, 0.5, 0.3]
    data.gmm_means = [[-2.0, -1.0], [1.5, -0.5], [0.0, 2.0]]
    data.gmm_stds = [0.4, 0.7, 0.5]
    t = config.training
    t.batch_size, t.n_iters = 256, 600
    t.log_freq = t.eval_freq = t.snapshot_freq = t.snapshot_freq_for_preemption = 600
    t.snapshot_freq, t.snapshot_sampling = 600, False
    config.model.nf, config.model.ema_rate = 32, 0.99
    config.optim.lr = 3e-3
    config.eval.num_test = config.eval.batch_size = 1000
    return config


@pytest.mark.slow
def test_short_training_reaches_the_mixture_entropy(tmp_path):
    """Test NLL (probability-flow ODE, exact divergence, 1000 held-out points) within 0.2 nats of H(p_0).

    The NLL's standard error is ≈ 0.025 nats and the entropy's Monte-Carlo one 0.003, so 0.2 leaves room for
    ~0.1 nats of model error; measured: NLL 2.765 vs H = 2.708 (the true density's NLL on the same points 2.734).
    """
    config = nll_config()
    run_lib.train(config, str(tmp_path))
    run_lib.evaluate(config, str(tmp_path))
    record = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text())
    mixture = datasets.get_dataset(config).density
    entropy, entropy_se = mixture.entropy(jax.random.PRNGKey(0))
    assert record["step"] == 600 and record["nll_nfe"] > 20
    assert abs(record["test_nll"] - entropy) < 0.2, (record, entropy, entropy_se)
    # The held-out points' NLL under the true density agrees with H to a few standard errors (same test set).
    assert abs(record["test_nll_true_density"] - entropy) < 4 * record["test_nll_se"] + 3 * entropy_se
