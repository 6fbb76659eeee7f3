"""8x8 scikit-learn digits with a small DDPM++ trained by flow matching on the rectified-flow path.

    python experiments/train.py --config experiments/configs/digits_rf_ddpmpp.py --workdir runs/digits_rf

``digits_vp_ddpmpp.py`` with the path ``x_t = (1 - t) x_0 + t eps`` (``jaxdiff.RectifiedFlow``) in place of the
VP SDE, a network that predicts the velocity ``eps - x_0`` and the conditional flow-matching loss (Lipman et al.
2023) with uniform ``t``: the same network, data, batch size, steps, optimiser and EMA, and the same end-of-run
evaluation (300 samples at 30 NFE, bits/dim through the probability-flow ODE, FID/KID/classifier score), so the
two runs' numbers compare directly. Sampling is DPM-Solver++(2M) on a grid uniform in ``t`` (the log-SNR grid
starts at -inf at ``t = 1``); ``--config.sampling.method=flow_euler --config.sampling.options="{}"`` is the
rectified-flow Euler sampler. Reverse-SDE samplers (``pc``, ``euler_maruyama``, ``ancestral``) do not apply on
this path. Logit-normal times (Esser et al. 2024): ``--config.training.time_sampling=logit_normal``.
"""

from ml_collections import ConfigDict, config_dict


def get_config():
    config = ConfigDict()
    config.name = "digits_rf_ddpmpp"
    config.seed = 0

    config.data = data = ConfigDict()
    data.dataset = "digits"
    data.image_size = config_dict.placeholder(int)  # native 8x8
    data.centered = True  # [-1, 1], as for the VP run
    data.random_flip = False  # digits are not mirror-symmetric
    data.dequantize = False

    config.sde = sde = ConfigDict()
    sde.name = "rectified_flow"  # alpha = 1 - t, sigma = t on [0, 1]: no schedule parameters
    sde.num_scales = 1000  # Euler-Maruyama steps of sde.discretize only

    config.model = model = ConfigDict()
    model.name = "ddpmpp"
    model.nf = 32
    model.ch_mult = (1, 2)  # 8x8 -> 4x4
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.0  # too few steps to overfit
    model.resblock_type = "biggan"
    model.skip_rescale = True
    model.embedding_type = "positional"
    model.init_scale = 0.0
    model.num_classes = config_dict.placeholder(int)  # 10 for class-conditional
    model.parameterization = "velocity"  # the network predicts eps - x_0
    model.scale_by_sigma = False
    model.ema_rate = 0.995  # short run: an EMA over the last ~200 steps
    model.dtype = "float32"  # compute dtype: "bfloat16" computes in bf16 from float32 parameters

    config.training = training = ConfigDict()
    training.batch_size = 64
    training.n_iters = 1500
    training.objective = "flow_matching"  # || u(x_t, t) - (eps - x_0) ||^2
    training.time_sampling = "uniform"  # or "logit_normal" (Esser et al. 2024)
    training.logit_mean = 0.0  # logit_normal only
    training.logit_std = 1.0  # logit_normal only
    training.continuous = True  # flow matching is continuous-time
    training.reduce_mean = True
    training.likelihood_weighting = False  # flow matching has its own weighting
    training.importance_sampling = False
    training.label_dropout = 0.0  # > 0 with num_classes trains for classifier-free guidance
    training.log_every = 100
    training.save_every = 500
    training.steps_per_call = 1  # optimiser steps per compiled call (a scan over stacked batches)
    training.keep = 2
    training.progress_bar = True

    config.optim = optim = ConfigDict()
    optim.optimizer = "adam"
    optim.lr = 2e-3  # ten times the paper's: a small network and a short run
    optim.warmup = 100
    optim.grad_clip = 1.0
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0

    config.sampling = sampling = ConfigDict()
    sampling.method = "dpm_solver++"
    sampling.steps = 30
    sampling.options = ConfigDict({"order": 2, "time_schedule": "uniform"})  # the log-SNR grid starts at -inf

    config.eval = ev = ConfigDict()
    ev.enabled = True
    ev.num_samples = 300  # as many as test images, for FID/KID
    ev.grid_size = 64  # images only
    ev.likelihood_examples = 200
    ev.hutchinson_probes = 1
    ev.ode_tol = 1e-4  # ODE rtol = atol; the paper's 1e-5 costs 2.5x the NFE on digits for bits/dim within 1e-3
    ev.density_grid = 0  # 2-D toys only
    ev.plot_range = (-3.0, 3.0)  # 2-D toys only
    ev.quality = True  # FID/KID/classifier score with jaxdiff.metrics, if installed
    return config
