"""--mode=train_dequantizer and the variational bits/dim of --mode=eval (run_lib section 12; seed 001, SPEC §4) on
the smallest image setup: DIGITS 8x8 (17 levels) with a one-block MLP score trained 2 steps, and a flow of 2
couplings of 8 features trained 4 steps of batch 8. The numbers are checked against dequantization.py called
directly with the keys, integers and parameters the loops are documented to use; resume must be bit-identical."""
import copy
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import datasets
import dequantization as dq
import run_lib
from test_run_lib import _trained_image_mlp, saved_arrays, tiny_config

STEPS = 4


def _small_flow(config, num_steps=STEPS):
    """A copy of config with the small flow and schedule, logging every step."""
    config = copy.deepcopy(config)
    d = config.dequantizer
    d.num_couplings, d.features, d.batch_size, d.num_steps, d.snapshot_freq = 2, 8, 8, num_steps, 2
    d.lr, d.warmup, d.n_t = 1e-2, 0, 2
    config.training.log_freq = 1
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, workdir, final DequantizerState): the score model trained, then its dequantizer, 4 steps."""
    workdir = tmp_path_factory.mktemp("deq")
    config = _small_flow(_trained_image_mlp(workdir, "DIGITS", 8, 1))
    return config, workdir, run_lib.train_dequantizer(config, str(workdir))


@pytest.fixture(scope="module")
def score(run):
    """(Setup of the flow's config, the score function of the restored EMA parameters: the frozen model)."""
    config, workdir, _ = run
    setup = run_lib.Setup(run_lib.dequantizer_config(config))
    return setup, setup.score_fn(run_lib.restore_latest(str(workdir), setup.config, setup)[0].ema_params)


def _flow_at(setup, workdir, step):
    """The DequantizerState saved at `step`."""
    manager = run_lib.checkpoint_managers(str(workdir / "dequantizer"), setup.config, create=False)[0]
    model = dq.Dequantizer(num_couplings=2, features=8)
    template = jax.eval_shape(lambda: dq.init_state(jax.random.PRNGKey(0), model, setup.dataset.shape,
                                                    run_lib.losses.get_optimizer(setup.config)))
    return run_lib.restore(manager, step, run_lib._abstract(template, setup.replicated), str(workdir))


def test_training_checkpoints_and_logs_the_bound_of_the_quantized_batch(run, score):
    """Checkpoints at 2 (snapshot_freq) and 4 (the end), a metrics line per step. Step 3's train_bpd is the mean
    variational bound (DSM form, n_t = 2) of the flow saved at step 2 on the integers of training batch 2 (0-based),
    recomputed here from dequantization.py with the key fold_in(train key, 2): the loop feeds the right integers,
    key and flow, and resumes from what it saves.
    """
    config, workdir, state = run
    folder = workdir / "dequantizer"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["2", "4"]
    assert int(state.step) == STEPS and (folder / "config.json").exists()
    records = run_lib.read_metrics(folder / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["score_step"] == 2 for r in records)

    setup, score_fn = score
    dataset = setup.dataset
    served = dataset.train_batch(2)
    k = dq.quantize(served, dataset.data_range, dataset.levels)
    assert k.shape == (8, 8, 8, 1) and dataset.levels == 17 and int(k.max()) <= 16
    # The bin centres are quantized exactly: k maps back to the served batch.
    np.testing.assert_allclose(dataset.to_float(np.asarray(k), 0.5), served, atol=1e-6)
    _, train_rng = run_lib._dequantizer_streams(setup)
    model = dq.Dequantizer(num_couplings=2, features=8)
    nll = dq.bound_nll_fn(setup.sde, score_fn, n_t=2, eps=config.training.eps, importance_sampling=True, form="dsm")
    bpd = dq.variational_bits_per_dim(jax.random.fold_in(train_rng, 2), model, _flow_at(setup, workdir, 2).params, k,
                                      nll, dataset.data_range, dataset.levels)
    # The same float32 computation, jitted with its gradient in the loop: measured relative difference ~1e-7.
    assert records[2]["train_bpd"] == pytest.approx(float(jnp.mean(bpd)), rel=1e-5)


def test_two_half_runs_end_bit_identical_to_one_run(run, tmp_path):
    """Steps 1-2, then a restart to 4, give the flow parameters and optimizer state of the uninterrupted 4 steps bit
    for bit, in memory and in the step-4 checkpoint."""
    config, workdir, state = run
    split = tmp_path / "split"
    for name in ("checkpoints", "config.json"):
        (shutil.copytree if name == "checkpoints" else shutil.copy)(workdir / name, split / name)
    half = run_lib.train_dequantizer(_small_flow(config, STEPS // 2), str(split))
    assert int(half.step) == 2
    resumed = run_lib.train_dequantizer(config, str(split))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(half.params), jax.tree.leaves(state.params)))
    for a, b in zip(saved_arrays(split, STEPS, "dequantizer/checkpoints"),
                    saved_arrays(workdir, STEPS, "dequantizer/checkpoints")):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in run_lib.read_metrics(split / "dequantizer" / "metrics.jsonl")] == [1, 2, 3, 4]


def _records(workdir):
    return run_lib.read_metrics(workdir / "eval" / "metrics.jsonl")


def test_eval_reports_the_variational_bpd_of_the_direct_computation(run, score, monkeypatch):
    """eval.dequantizer with the ODE: the saved per-image bpd are dequantization.variational_bits_per_dim of the
    test integers with the flow of step 4 and the key fold_in(fold_in(eval key of step 2, _DEQUANTIZER), batch);
    vdeq_bpd is their mean, vdeq_gain_bpd the paired uniform-minus-variational difference (test_bpd - vdeq_bpd);
    a rerun reads the saved batch instead of recomputing. With the bound, the same with -log p by the bound."""
    config, workdir = copy.deepcopy(run[0]), run[1]
    e = config.eval
    e.dequantizer, e.enable_bpd, e.num_test, e.batch_size, e.bpd_repeats = True, True, 8, 8, 1
    run_lib.evaluate(config, str(workdir))
    (record,) = _records(workdir)
    saved = np.load(workdir / "eval" / "step_00000002" / "vdeq_ode" / "r000_b00000.npz")["bpd"]
    assert record["vdeq_bpd"] == pytest.approx(saved.mean(), rel=1e-12)
    assert (record["vdeq_step"], record["vdeq_bound"]) == (STEPS, 0.0)
    assert record["vdeq_gain_bpd"] == pytest.approx(record["test_bpd"] - record["vdeq_bpd"], abs=1e-6)

    setup, score_fn = score
    model, params, step = run_lib.restore_dequantizer(config, str(workdir), setup)
    rng = jax.random.fold_in(jax.random.fold_in(setup.rngs["eval"], 2), run_lib._DEQUANTIZER)
    k = jnp.asarray(datasets.get_dataset(config).test_levels[:8])
    nll = dq.ode_nll_fn(setup.sde, score_fn, **run_lib.ode_settings(config, setup.dataset))
    direct = dq.variational_bits_per_dim(jax.random.fold_in(rng, 0), model, params, k, nll, (-1.0, 1.0), 17)
    # The same calls on the same inputs: measured identical; 1e-6 leaves room for float32 re-association only.
    np.testing.assert_allclose(saved, np.asarray(direct), rtol=1e-6)
    assert step == STEPS and np.ptp(saved) > 0

    def refuse(*args, **kwargs):
        raise AssertionError("a saved batch was computed again")

    monkeypatch.setattr(dq, "variational_bits_per_dim", refuse)
    monkeypatch.setattr(run_lib.likelihood, "log_likelihood", lambda *a, **k: refuse())
    run_lib.evaluate(config, str(workdir))
    assert _records(workdir)[-1]["vdeq_bpd"] == record["vdeq_bpd"]
    monkeypatch.undo()

    e.enable_bpd, e.dequantizer_nll, e.enable_bound, e.bound_n_t = False, "bound", True, 8
    run_lib.evaluate(config, str(workdir))
    bound = _records(workdir)[-1]
    saved = np.load(workdir / "eval" / "step_00000002" / "vdeq_bound" / "r000_b00000.npz")["bpd"]
    nll = dq.bound_nll_fn(setup.sde, score_fn, **run_lib.bound_settings(config))
    direct = dq.variational_bits_per_dim(jax.random.fold_in(rng, 0), model, params, k, nll, (-1.0, 1.0), 17)
    np.testing.assert_allclose(saved, np.asarray(direct), rtol=1e-6)
    assert bound["vdeq_bound"] == 1.0 and bound["vdeq_bpd"] == pytest.approx(saved.mean(), rel=1e-12)
    assert bound["vdeq_gain_bpd"] == pytest.approx(bound["bound_bpd"] - bound["vdeq_bpd"], abs=1e-6)


def test_errors_name_the_fix(run, tmp_path):
    """No dequantizer checkpoint: the error names --mode=train_dequantizer; no score checkpoint: --mode=train; a
    flow of other config.dequantizer sizes: where its settings are; continuous toy data and bad dequantizer fields:
    one line each, before anything is computed."""
    config, workdir = copy.deepcopy(run[0]), run[1]
    bare = tmp_path / "bare"
    shutil.copytree(workdir / "checkpoints", bare / "checkpoints")
    config.eval.dequantizer = True
    with pytest.raises(ValueError, match=r"holds no trained dequantizer; .* --workdir=.*bare --mode=train_dequantizer"):
        run_lib.evaluate(config, str(bare))
    with pytest.raises(ValueError, match="train first with --mode=train"):
        run_lib.train_dequantizer(config, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="toy data are continuous"):
        run_lib.train_dequantizer(tiny_config(), str(workdir))
    config.dequantizer.features = 16
    for mode in (run_lib.evaluate, run_lib.train_dequantizer):
        with pytest.raises(ValueError, match="trained with other config.dequantizer settings .* pass those of"):
            mode(config, str(workdir))
    config.dequantizer.features, config.dequantizer.n_t = 8, 1
    with pytest.raises(ValueError, match=r"config.dequantizer.n_t must be >= 2"):
        run_lib.train_dequantizer(config, str(workdir))
    config.dequantizer.n_t, config.dequantizer.eps = 2, 1.5
    with pytest.raises(ValueError, match=r"config.dequantizer.eps must lie in \(0, T\)"):
        run_lib.train_dequantizer(config, str(workdir))
