"""Entry point: train, evaluate or sample a score-based model from a config file.

    python main.py --config=configs/toy/vp_gmm.py --workdir=runs/vp_gmm --mode=train
    python main.py --config=configs/toy/vp_gmm.py --workdir=runs/vp_gmm --mode=eval
    python main.py --config=configs/toy/vp_gmm.py --workdir=runs/vp_gmm --mode=sample --config.sampling.method=ode
    python main.py --config=configs/demo/mnist_ddpmpp.py --workdir=runs/demo --mode=inpaint --inpaint_mask=centre
    python main.py --config=configs/demo/mnist_ddpmpp.py --workdir=runs/demo --mode=train_dequantizer
    python main.py --config=configs/demo/mnist_ddpmpp.py --workdir=runs/demo --mode=eval --config.eval.dequantizer=True
    python main.py --config=configs/demo/mnist_ddpmpp.py --workdir=runs/demo --mode=class_conditional
        --classifier=runs/classifiers/mnist5k_noisy.msgpack --class_scale=3
    python main.py --config=configs/vp/cifar10_ddpmpp_continuous.py --mode=summary
    python main.py --config=... --workdir=<shared directory> --mode=train --multihost   # on every host (Slurm, TPU pod)

`--config.<section>.<field>=value` overrides any config field (ml_collections rejects unknown fields and wrong
types; tuples are written --config.data.gmm_stds='(0.4, 0.7, 0.5)'). A user error (bad flag or config value,
unusable workdir, a checkpoint of another model, a diverged run) prints one line "error: ..." to stderr and exits
with status 1.
"""
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and evaluation results.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "inpaint", "class_conditional", "summary",
                                    "train_dequantizer"],
                  "train: train (resumes from --workdir); eval: evaluate checkpoints; sample: draw samples from the "
                  "newest checkpoint; inpaint: fill the --inpaint_mask part of test images; class_conditional: "
                  "samples of each class with the --classifier; summary: print the model's parameter shapes, count "
                  "and FLOPs per example (needs no --workdir); train_dequantizer: fit config.dequantizer's "
                  "variational dequantizer to the newest checkpoint (resumes; --workdir/dequantizer), for "
                  "--mode=eval --config.eval.dequantizer=True.")
flags.DEFINE_string("inpaint_mask", "right_half", "--mode=inpaint: right_half | bottom_half | centre (the hidden "
                    "pixels), or colour (colorization of RGB images: the grey level is known).")
flags.DEFINE_string("classifier", None, "--mode=class_conditional: a time-dependent classifier "
                    "(scripts/train_digit_classifier.py --noise_config=<the config file>).")
flags.DEFINE_float("class_scale", 1.0, "--mode=class_conditional: the classifier gradient's scale (1 = exact).")
flags.DEFINE_string("eval_folder", "eval", "Subdirectory of --workdir for --mode=eval results.")
flags.DEFINE_bool("multihost", False, "One process of a multi-host run: jax.distributed.initialize() before "
                  "anything else, finding the coordinator from the cluster (Slurm, Open MPI, Cloud TPU pods), or from "
                  "--coordinator_address, --num_processes and --process_id when given (any machines, CPUs too).")
flags.DEFINE_string("coordinator_address", None, "--multihost: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "--multihost: how many processes the run has.")
flags.DEFINE_integer("process_id", None, "--multihost: this process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config"])


def fail(message):
    """One line on stderr, exit status 1."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(1)


def _unknown_field(error, argv):
    """The message for an override of a field the config does not have (ml_collections raises a KeyError,
    sometimes wrapped in an AttributeError, whose text is the quoted name and maybe a did-you-mean hint)."""
    inner = error if isinstance(error, KeyError) else (error.__context__ or error)
    name, hint = re.match(r"\W*(\w+)\W*(.*)", str(inner.args[0] if inner.args else inner), re.S).groups()
    culprits = [a for a in argv if a.startswith("--config.") and re.search(rf"\.{name}\b", a.split("=")[0])]
    return f"{' '.join(culprits) or '--config override'}: the config has no field {name!r}" + (
        f"; {hint}" if hint else "")


def parse_flags(argv):
    """absl's flag parsing, with a flag or config error reported as one line instead of usage text."""
    try:
        argv = FLAGS(argv)
    except flags.Error as e:
        fail(e)
    except (AttributeError, KeyError) as e:
        fail(_unknown_field(e, argv))
    try:
        FLAGS.config.get("training")  # a config file that failed to load raises only when first used
    except OSError as e:
        fail(e)
    return argv


def _not_orbax(record):
    """Keeps orbax's per-checkpoint INFO chatter off the console (its warnings and errors still show)."""
    return record.levelno >= logging.converter.STANDARD_WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags are written --name=value")
    if FLAGS.mode != "summary" and not FLAGS.workdir:
        fail(f"--mode={FLAGS.mode} needs --workdir=<directory for checkpoints, metrics and samples>")
    if FLAGS.multihost:
        import jax

        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import run_lib  # after the flags are parsed, so a flag error is reported without waiting for jax to load

    modes = {
        "train": lambda: run_lib.train(FLAGS.config, FLAGS.workdir),
        "eval": lambda: run_lib.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.eval_folder),
        "sample": lambda: run_lib.sample(FLAGS.config, FLAGS.workdir),
        "inpaint": lambda: run_lib.inpaint(FLAGS.config, FLAGS.workdir, FLAGS.inpaint_mask),
        "class_conditional": lambda: run_lib.class_conditional(FLAGS.config, FLAGS.workdir, FLAGS.classifier,
                                                               FLAGS.class_scale),
        "summary": lambda: run_lib.print_summary(FLAGS.config),
        "train_dequantizer": lambda: run_lib.train_dequantizer(FLAGS.config, FLAGS.workdir),
    }
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_not_orbax)
    try:
        modes[FLAGS.mode]()
    except run_lib.USER_ERRORS as e:
        fail(e)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
