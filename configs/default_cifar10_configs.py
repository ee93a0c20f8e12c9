"""CIFAR-10 base of the score-SDE image experiments; the CelebA, LSUN and MNIST bases start from it.

Field names and values are those of the score-SDE code (yang-song/score_sde,
configs/default_cifar10_configs.py), with these project deviations, shared by every image config:
1. training.weighting replaces the boolean training.likelihood_weighting: "sigma2" (λ = σ_t², the reference's
   False), "likelihood" (λ = g², its True) or "likelihood_importance" (λ = g² with t drawn from q(t) ∝ g²/σ_t²,
   seed 001); SPEC §3.
2. Added fields: data.tfds_data_dir (where scripts/prepare_dataset.py put the data), training.eps (smallest
   training time), training.max_to_keep (permanent checkpoints kept), sampling.eps (smallest sampling time, set
   by each experiment: 1e-3 VP / sub-VP, 1e-5 VE; SPEC §1), sampling.num_samples (the grid of --mode=sample),
   training.fp (the score-FPE regularizer of seed 002, SPEC §5), config.dequantizer with eval.dequantizer and
   eval.dequantizer_nll (variational dequantization of seed 001: --mode=train_dequantizer and the variational
   bits/dim; score_flow's config.deq), eval.eps, eval.rtol, eval.atol and
   eval.exact_divergence (the likelihood ODE, SPEC §4), eval.num_test (test images for bits/dim),
   eval.enable_sample_quality and the fields after it (FID / IS / KID, SPEC §8); ve/ncsn and ve/ncsnv2 add
   sampling.step_lr. The reference's eval.enable_sampling is kept but not read.
3. Names are lower case as the code registers them: optim.optimizer "adam", sampling.predictor "ancestral" (the
   reference's "ancestral_sampling"); training.sde, sampling.method, predictor and corrector otherwise keep the
   reference's values ("vesde" | "vpsde" | "subvpsde"; "pc" | "ode" | "ald"; "reverse_diffusion" |
   "euler_maruyama" | "ancestral" | "none"; "langevin" | "ald" | "none").
4. Dropped: optim.amsgrad (always False in the reference) and the reference's unused locals and misspellings.
5. eval.begin_ckpt..end_ckpt never exceed the training.n_iters // snapshot_freq checkpoints a run writes (the
   reference names later ones for the 950k-step deep runs and the 2.4M-step LSUN-based runs; its eval waits for
   them).

After training, `--mode=eval` evaluates checkpoints eval.begin_ckpt..end_ckpt; add
--config.eval.enable_sample_quality=True --config.eval.inception_weights=<pytorch-fid's FID Inception .pth> for
FID / IS / KID on eval.num_samples samples, or --config.eval.enable_bpd=True for bits/dim on uniformly
dequantized test images (the paper's NLL).

Cost: the score-SDE paper names no hardware. The score_sde_pytorch README measures NCSN++ cont. (VE, CIFAR-10)
on 4×V100 (32 GB) at 0.20 s/step in JAX with n_jitted_steps = 5 (0.30 s with 1): about 3 days for 1.3M steps.
"""
import ml_collections


def get_default_configs():
    config = ml_collections.ConfigDict()
    config.seed = 42

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.n_iters = 1300001            # 1.3M steps, the paper's default training length
    training.snapshot_freq = 50000        # a permanent checkpoint (and FID candidate) every 50k steps
    training.log_freq = 50
    training.eval_freq = 100
    training.snapshot_freq_for_preemption = 10000  # the "meta" checkpoint that resumes a killed run
    training.snapshot_sampling = True     # a sample grid with every permanent checkpoint
    training.max_to_keep = 30             # ≥ the 26 permanent checkpoints, all of which eval may sweep
    training.weighting = "sigma2"         # sigma2 | likelihood | likelihood_importance (SPEC §3)
    training.continuous = True
    training.n_jitted_steps = 5           # steps per compiled call; log/eval/snapshot freqs must be multiples
    training.reduce_mean = False          # False: ½ sum over dimensions (VP / sub-VP experiments set True)
    training.eps = 1e-5                   # smallest training time
    # Score Fokker-Planck regularizer (FP-Diffusion, SPEC §5) on the DSM objective: weight α (0 = off; the paper
    # uses 0.15 for images), w(t) "one" | "g2", probe "exact" (small D) | "rademacher" | "gaussian", t range.
    training.fp = ml_collections.ConfigDict(dict(weight=0.0, time_weighting="one", probe="rademacher",
                                                 t_min=0.0, t_max=1.0))

    # Variational dequantization (seed 001; SPEC §4). --mode=train_dequantizer (run_lib.train_dequantizer): the
    # flow q(u | k) of dequantization.Dequantizer, fitted to the newest checkpoint's frozen EMA score by the DSM form
    # of seed 001's bound; checkpoints: <workdir>/dequantizer.
    # Sizes and schedule follow score_flow (yang-song/score_flow: configs/default_cifar10_configs.py config.deq,
    # run_lib.train_deq, models/flowpp/dequantization_cifar10.py): 4 couplings of 96 filters, 300k steps of batch 128
    # at optim's lr 2e-4 with its 5,000-step warm-up, one time per image, t importance-sampled, resumable every 10k.
    config.dequantizer = dequantizer = ml_collections.ConfigDict()
    dequantizer.num_couplings = 4         # affine couplings (score_flow: 4 mixture-logistic couplings)
    dequantizer.features = 96             # channels of each coupling's 3x3 convolutions (score_flow: filters = 96)
    dequantizer.lr = 2e-4
    dequantizer.warmup = 5000             # linear learning-rate warm-up steps; optim.grad_clip applies too
    dequantizer.num_steps = 300000
    dequantizer.batch_size = 128
    dequantizer.n_t = 2                   # times per image in the bound (score_flow 1; the estimator needs >= 2)
    dequantizer.importance_sampling = True  # t ~ q(t) ∝ g²/σ² (seed 001)
    dequantizer.eps = ml_collections.config_dict.placeholder(float)  # the bound's smallest time; unset: training.eps
    dequantizer.snapshot_freq = 10000     # checkpoint (and resume point) every 10k steps and at the end

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.n_steps_each = 1             # corrector steps per noise level
    sampling.noise_removal = True         # one denoising step at the end
    sampling.probability_flow = False     # True: predictors step the probability-flow ODE, not the reverse SDE
    sampling.snr = 0.16                   # Langevin corrector signal-to-noise ratio (SPEC §7)
    sampling.num_samples = 64             # images drawn by --mode=sample (50000 for FID-scale sets)
    sampling.shard_size = 1024            # per sampler call, split over the devices; one .npz shard each
    # method "ode": adaptive "tsit5" | "dopri5" (ode_rtol, ode_atol) or fixed-step "euler" | "heun" | "midpoint"
    # (ode_steps steps, spaced "uniform" in t or "edm": Karras et al. 2022 with ρ = ode_rho)
    sampling.ode_solver = "tsit5"
    sampling.ode_rtol = 1e-5
    sampling.ode_atol = 1e-5
    sampling.ode_steps = 30
    sampling.ode_schedule = "uniform"
    sampling.ode_rho = 7.0
    # method "edm": Karras et al. (2022)'s stochastic sampler, edm_steps Heun steps on the ρ = ode_rho grid with
    # churn S_churn = edm_churn on σ̃ in edm_churn_range and S_noise = edm_noise (their ImageNet-64 values)
    sampling.edm_steps = 18
    sampling.edm_churn = 40.0
    sampling.edm_churn_range = (0.05, 50.0)
    sampling.edm_noise = 1.003

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.begin_ckpt = 9               # checkpoints 9..26 (450k..1.3M steps) are swept for the best FID
    evaluate.end_ckpt = 26
    evaluate.batch_size = 1024
    evaluate.enable_sampling = False
    evaluate.num_samples = 50000          # FID / IS sample count of the paper (SPEC §8)
    evaluate.enable_loss = True
    evaluate.enable_bpd = False
    evaluate.bpd_dataset = "test"
    evaluate.num_test = 10000             # the CIFAR-10 test split
    evaluate.bpd_repeats = 5              # dequantization and Hutchinson draws per test image (score-SDE's eval)
    # Seed 001's bound on the SDE model's NLL (likelihood.likelihood_bound, DSM form), reported beside the ODE NLL.
    evaluate.enable_bound = False
    evaluate.bound_n_t = 1000             # time samples per test point (Monte-Carlo error per point ~ 1/sqrt(n_t))
    evaluate.bound_importance = True      # t ~ q(t) ∝ g²/σ² (seed 001's importance sampling)
    evaluate.bound_t_chunk = 8            # time samples evaluated together: a score batch of bound_t_chunk x batch
    # Variational bits/dim (seed 001) with the dequantizer of --mode=train_dequantizer, beside the uniform numbers:
    # -log p from the probability-flow ODE ("ode", eval.rtol / atol / eps) or seed 001's bound ("bound", eval.bound_*).
    evaluate.dequantizer = False
    evaluate.dequantizer_nll = "ode"
    evaluate.eps = 1e-5                   # the likelihood ODE starts here (SPEC §4)
    evaluate.exact_divergence = False     # Hutchinson: the exact trace needs D = 3072 passes
    evaluate.rtol = 1e-5
    evaluate.atol = 1e-5
    # FID / IS / KID of eval.num_samples samples against the test split (evaluation.sample_quality_evaluator).
    evaluate.enable_sample_quality = False
    evaluate.sample_quality_features = "inception"  # comma-separated: inception (FID / KID / IS) | classifier
    # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (SHA-256 checked; models/inception.py says where).
    evaluate.inception_weights = ml_collections.config_dict.placeholder(str)
    evaluate.inception_preprocessing = "pytorch_fid"  # pytorch_fid | tf_graph: the resize to 299x299
    # The digit classifier of scripts/train_digit_classifier.py (embedded grey digit sets): FCD / KCD / score.
    evaluate.classifier_weights = ml_collections.config_dict.placeholder(str)
    # Reference statistics (.npz): loaded if the file exists, else computed from the test split and written
    # there; unset: computed once per --mode=eval run. inception_stats also takes pytorch-fid's files and the
    # score-SDE code's <dataset>_stats.npz.
    evaluate.inception_stats = ml_collections.config_dict.placeholder(str)
    evaluate.classifier_stats = ml_collections.config_dict.placeholder(str)
    evaluate.kid_subsets = 100            # KID: mean and standard error over 100 subset pairs of 1,000 examples
    evaluate.kid_subset_size = 1000       # (fewer when there are fewer samples)
    evaluate.is_splits = 10               # IS: mean and standard deviation over 10 splits (Salimans et al. 2016)

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "CIFAR10"
    data.image_size = 32
    data.num_channels = 3
    data.random_flip = True
    data.centered = False                 # [0, 1]; VP / sub-VP experiments center to [-1, 1]
    data.uniform_dequantization = False
    # Where scripts/prepare_dataset.py prepared the tensorflow-datasets sets; unset: $TFDS_DATA_DIR or
    # ~/tensorflow_datasets.
    data.tfds_data_dir = ml_collections.config_dict.placeholder(str)

    config.model = model = ml_collections.ConfigDict()
    model.sigma_min = 0.01
    model.sigma_max = 50.0                # ≈ the largest pairwise distance of CIFAR-10 images (Song & Ermon 2020)
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.dropout = 0.1
    model.embedding_type = "fourier"      # fourier (VE continuous, of log σ) | positional (labels 999 t or indices)

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000                   # linear learning-rate warm-up steps
    optim.grad_clip = 1.0                 # global-norm clipping; ≤ 0 disables it
    return config
