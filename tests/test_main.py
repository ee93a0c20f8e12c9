"""The command line: user errors give one line "error: ..." and exit status 1 without touching existing
checkpoints, and a run killed with SIGKILL and restarted ends bit-identical to an uninterrupted one."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import run_lib
from test_run_lib import ROOT, file_hashes, saved_arrays

CONFIG = "configs/toy/vp_gmm.py"
# vp_gmm shrunk to a seconds-long run: a one-block MLP, batch 32, 25 noise levels, no sample plots.
TINY = {"training.batch_size": 32, "training.n_iters": 8, "training.log_freq": 4, "training.eval_freq": 8,
        "training.snapshot_freq": 8, "training.snapshot_freq_for_preemption": 4, "training.snapshot_sampling": False,
        "model.nf": 16, "model.num_layers": 1, "model.num_scales": 25, "eval.num_test": 64, "eval.batch_size": 32}


def flags_of(overrides):
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def run_main(workdir, *extra, overrides=TINY, wait=True):
    args = [sys.executable, "main.py", f"--config={CONFIG}", f"--workdir={workdir}", *flags_of(overrides), *extra]
    if not wait:
        return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=170)


def config_with(overrides):
    """The config that `run_main(..., overrides=overrides)` builds, for training in this process."""
    namespace = {}
    exec(compile((ROOT / CONFIG).read_text(), CONFIG, "exec"), namespace)
    config = namespace["get_config"]()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def assert_one_line_error(result, *fragments):
    """Exit status 1; the last stderr line is the only "error:" line and names the problem; no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, lines[-3:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


BAD_COMMANDS = [
    ("unknown key", ["--config.training.no_such_key=1"], ["--config.training.no_such_key=1",
                                                         "the config has no field 'no_such_key'"]),
    ("misspelt key", ["--config.training.batch_sise=3"], ["no field 'batch_sise'", 'Did you mean "batch_size"']),
    ("wrong type", ["--config.training.batch_size=abc"], ["--config.training.batch_size=abc",
                                                          "invalid literal for int()"]),
    ("negative batch", ["--config.training.batch_size=-4"], ["config.training.batch_size must be > 0, got -4"]),
    ("eps above T", ["--config.training.eps=1.5"], ["config.training.eps must lie in (0, T) = (0, 1.0), got 1.5"]),
    ("eps zero", ["--config.sampling.eps=0.0"], ["config.sampling.eps must lie in (0, T)"]),
    ("bad mode", ["--mode=fit"], ["--mode=fit", "train|eval|sample"]),
    ("no classifier", ["--mode=class_conditional"], ["--mode=class_conditional needs --classifier="]),
    ("bad inpainting mask", ["--mode=inpaint", "--inpaint_mask=left"], ["unknown inpainting mask 'left'"]),
]


@pytest.mark.parametrize("args, fragments", [b[1:] for b in BAD_COMMANDS], ids=[b[0] for b in BAD_COMMANDS])
def test_bad_flags_and_config_values_give_one_line(tmp_path, args, fragments):
    assert_one_line_error(run_main(tmp_path / "run", *args), *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_summary_needs_no_workdir_and_prints_the_count():
    """--mode=summary on the DDPM++ CIFAR-10 config: the reference's 61,804,419 parameters (yang-song/score_sde,
    configs/vp/cifar10_ddpmpp_continuous.py; the tree is matched leaf by leaf in tests/test_models_images.py)."""
    result = subprocess.run([sys.executable, "main.py", "--config=configs/vp/cifar10_ddpmpp_continuous.py",
                             "--mode=summary"], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"model ncsnpp: 61,804,419 parameters; input \(32, 32, 3\) -> output \(32, 32, 3\); "
                        r"\d+\.\d{3} GFLOP per example \(forward\)", last), last
    assert float(last.split("; ")[-1].split()[0]) > 10  # ~20 GFLOP: a 62M-parameter U-Net at 32x32


def test_train_without_workdir_gives_one_line():
    result = subprocess.run([sys.executable, "main.py", f"--config={CONFIG}", "--mode=train"], cwd=ROOT,
                            capture_output=True, text=True, timeout=170)
    assert_one_line_error(result, "--mode=train needs --workdir=")


def test_unwritable_workdir_gives_one_line(tmp_path):
    """A path under a regular file cannot be created, even by root (chmod would not stop root)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_one_line_error(run_main(blocker / "sub"), f"error: cannot write to {blocker}/sub: Not a directory")


def test_checkpoint_of_another_model_gives_one_line_and_is_untouched(tmp_path):
    run_lib.train(config_with(TINY), str(tmp_path))
    before = file_hashes(tmp_path)
    line = assert_one_line_error(run_main(tmp_path, "--config.model.nf=32"),
                                 f"checkpoint in {tmp_path} was made by a different model", "use a new --workdir")
    assert re.search(r"parameter Dense_\d+/\w+ has shape \(\d+(, \d+)*,?\) in the checkpoint", line)
    assert file_hashes(tmp_path) == before


def _wait_for_meta_checkpoint(process, workdir, timeout=150):
    """Polls until checkpoints-meta holds a complete checkpoint (orbax renames its temporary folder to the bare
    step number when the save is committed); returns its step."""
    meta = workdir / "checkpoints-meta"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        steps = [int(name) for name in (os.listdir(meta) if meta.exists() else []) if name.isdigit()]
        if steps:
            return max(steps)
        time.sleep(0.05)
    raise AssertionError(f"no meta checkpoint appeared (exit status {process.poll()}): {process.stderr.read()}")


@pytest.mark.slow
def test_kill_9_and_restart_ends_bit_identical(tmp_path):
    """SIGKILL once a meta checkpoint exists, restart to the end; compare every array with an uninterrupted run."""
    overrides = dict(TINY, **{"training.n_iters": 400, "training.snapshot_freq": 400, "training.log_freq": 10,
                              "training.eval_freq": 400, "training.snapshot_freq_for_preemption": 10})
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    process = run_main(killed, overrides=overrides, wait=False)
    try:
        seen = _wait_for_meta_checkpoint(process, killed)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / "400").exists(), "the run finished before it was killed"

    restarted = run_main(killed, overrides=overrides)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    resumed_from = int(re.search(r"resuming from the checkpoint of step (\d+)", restarted.stderr).group(1))
    assert seen <= resumed_from < 400
    finished = run_main(straight, overrides=overrides)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming" not in finished.stderr

    resumed, uninterrupted = saved_arrays(killed, 400), saved_arrays(straight, 400)
    assert len(resumed) == len(uninterrupted) > 10
    assert all(a.shape == b.shape and (a == b).all() for a, b in zip(resumed, uninterrupted))
