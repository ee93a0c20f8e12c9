"""Base config for low-dimensional data (2-D toy densities, Gaussian mixtures) with an MLP score network.

The field names follow the score-SDE code's configs, so score-SDE users find what they expect.
"""
import ml_collections


def get_default_configs():
    config = ml_collections.ConfigDict()
    config.seed = 42

    config.training = training = ml_collections.ConfigDict()
    training.sde = "vpsde"                # vesde | vpsde | subvpsde
    training.continuous = True            # continuous-time DSM; False: the discrete SMLD / DDPM losses
    training.weighting = "sigma2"         # sigma2 | likelihood | likelihood_importance (SPEC §3)
    training.reduce_mean = False          # mean over dimensions; False: ½ sum (the score-SDE convention)
    training.eps = 1e-5                   # smallest training time
    # Score Fokker-Planck regularizer (FP-Diffusion, SPEC §5) on the DSM objective: weight α (0 = off; the paper
    # uses 0.15 for images), w(t) "one" | "g2", probe "exact" (small D) | "rademacher" | "gaussian", t range.
    training.fp = ml_collections.ConfigDict(dict(weight=0.0, time_weighting="one", probe="rademacher",
                                                 t_min=0.0, t_max=1.0))
    training.batch_size = 512
    training.n_iters = 5000
    training.n_jitted_steps = 1           # train steps fused into one compiled call (lax.scan)
    training.log_freq = 100
    training.eval_freq = 500
    training.snapshot_freq = 2500         # permanent checkpoints in workdir/checkpoints
    training.snapshot_freq_for_preemption = 500  # the "meta" checkpoint that resumes a killed run
    training.max_to_keep = 5
    training.snapshot_sampling = True     # a sample plot with every permanent checkpoint

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "pc"                # pc | ode | ald | euler
    sampling.predictor = "euler_maruyama"  # euler_maruyama | reverse_diffusion | ancestral | none
    sampling.corrector = "none"           # langevin | ald | none
    sampling.n_steps_each = 1
    sampling.snr = 0.16
    sampling.noise_removal = True
    sampling.eps = 1e-3
    sampling.num_samples = 2000
    sampling.shard_size = 2000            # samples per sampler call (and per .npz shard of --mode=sample)
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
    evaluate.batch_size = 1000
    evaluate.num_test = 2000              # held-out samples for the test NLL
    evaluate.bpd_repeats = 1              # passes over them with fresh Hutchinson probes (exact divergence: 1)
    evaluate.enable_bpd = True
    # Seed 001's bound on the SDE model's NLL (likelihood.likelihood_bound, DSM form), reported beside the ODE NLL.
    evaluate.enable_bound = True
    evaluate.bound_n_t = 1000             # time samples per test point (Monte-Carlo error per point ~ 1/sqrt(n_t))
    evaluate.bound_importance = True      # t ~ q(t) ∝ g²/σ² (seed 001's importance sampling)
    evaluate.bound_t_chunk = 8            # time samples evaluated together: a score batch of bound_t_chunk x batch
    evaluate.eps = 1e-5
    evaluate.exact_divergence = True      # exact trace of the Jacobian: fine for small D
    evaluate.rtol = 1e-5
    evaluate.atol = 1e-5
    evaluate.begin_ckpt = 1
    evaluate.end_ckpt = 1

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "eight_gaussians"      # see datasets.TOY_DATASETS
    data.dim = 2

    config.model = model = ml_collections.ConfigDict()
    model.name = "mlp"
    model.nf = 64
    model.num_layers = 3
    model.embedding_type = "positional"   # positional (VP: labels 999 t) | fourier (VE: log σ)
    model.fourier_scale = 16.0
    model.scale_by_sigma = False
    model.dropout = 0.0
    model.ema_rate = 0.999
    model.sigma_min = 0.01
    model.sigma_max = 10.0                # ≥ the largest pairwise data distance (Song & Ermon 2020, technique 1)
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.num_scales = 1000

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"
    optim.lr = 1e-3
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 100
    optim.grad_clip = 1.0
    return config
