"""8x8 digits with a small NCSN++ and the VE SDE; a few minutes on a CPU.

    python experiments/train.py --config experiments/configs/digits_ve_ncsnpp.py --workdir runs/digits_ve

NCSN++'s options at 8x8 (FIR resampling, the residual input pyramid, Fourier features of log sigma), a
network that outputs the score scaled by 1/sigma, data in [0, 1], and the predictor-corrector sampler
(reverse diffusion + Langevin) of the paper's VE models.
"""

from ml_collections import ConfigDict, config_dict


def get_config():
    config = ConfigDict()
    config.name = "digits_ve_ncsnpp"
    config.seed = 0

    config.data = data = ConfigDict()
    data.dataset = "digits"
    data.image_size = config_dict.placeholder(int)  # native 8x8
    data.centered = False  # [0, 1], as for the VE SDE in the paper
    data.random_flip = False  # digits are not mirror-symmetric
    data.dequantize = False

    config.sde = sde = ConfigDict()
    sde.name = "vesde"
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01  # VE only
    sde.sigma_max = 5.0  # the largest distance between two digits in [0, 1] is 4.8
    sde.num_scales = 1000

    config.model = model = ConfigDict()
    model.name = "ncsnpp"
    model.nf = 32
    model.ch_mult = (1, 2)  # 8x8 -> 4x4
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.0  # too few steps to overfit
    model.resblock_type = "biggan"
    model.skip_rescale = True
    model.embedding_type = "fourier"  # log sigma(t)
    model.fir = True
    model.progressive_input = "residual"
    model.init_scale = 0.0
    model.num_classes = config_dict.placeholder(int)  # 10 for class-conditional
    model.parameterization = "score"
    model.scale_by_sigma = True  # score = output / sigma(t)
    model.ema_rate = 0.995  # short run: an EMA over the last ~200 steps
    model.dtype = "float32"  # compute dtype: "bfloat16" computes in bf16 from float32 parameters

    config.training = training = ConfigDict()
    training.batch_size = 64
    training.n_iters = 1500
    training.continuous = True
    training.reduce_mean = False  # the VE configs sum over dimensions
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
    optim.lr = 1e-3  # five times the paper's: a small network and a short run
    optim.warmup = 100
    optim.grad_clip = 1.0
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0

    config.sampling = sampling = ConfigDict()
    sampling.method = "pc"
    sampling.steps = 200
    sampling.options = ConfigDict({"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16})

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
