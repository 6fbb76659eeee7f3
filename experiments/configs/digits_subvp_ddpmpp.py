"""8x8 digits with the small DDPM++ of ``digits_vp_ddpmpp.py`` and the sub-VP SDE; a few minutes on a CPU.

    python experiments/train.py --config experiments/configs/digits_subvp_ddpmpp.py --workdir runs/digits_subvp

The sub-VP SDE (Song et al., ICLR 2021, eq. 29) has the VP SDE's mean and a smaller variance; its likelihoods
were the paper's best. Everything else as in the embedded default.
"""

from ml_collections import ConfigDict, config_dict


def get_config():
    config = ConfigDict()
    config.name = "digits_subvp_ddpmpp"
    config.seed = 0

    config.data = data = ConfigDict()
    data.dataset = "digits"
    data.image_size = config_dict.placeholder(int)  # native 8x8
    data.centered = True  # [-1, 1], as for the VP SDE in the paper
    data.random_flip = False  # digits are not mirror-symmetric
    data.dequantize = False

    config.sde = sde = ConfigDict()
    sde.name = "subvpsde"
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01  # VE only
    sde.sigma_max = 15.0  # VE only
    sde.num_scales = 1000

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
    model.parameterization = "eps"
    model.scale_by_sigma = False
    model.ema_rate = 0.995  # short run: an EMA over the last ~200 steps
    model.dtype = "float32"  # compute dtype: "bfloat16" computes in bf16 from float32 parameters

    config.training = training = ConfigDict()
    training.batch_size = 64
    training.n_iters = 1500
    training.continuous = True
    training.reduce_mean = True
    training.likelihood_weighting = False
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
    sampling.options = ConfigDict({"order": 2})

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
