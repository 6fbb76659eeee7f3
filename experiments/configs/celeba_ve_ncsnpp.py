"""CelebA 64x64, NCSN++ with the VE SDE's discrete SMLD objective, as the score-SDE paper's CelebA configuration.

    python experiments/train.py --config experiments/configs/celeba_ve_ncsnpp.py --workdir runs/celeba

Reference: yang-song/score_sde, configs/ve/celeba_ncsnpp.py (sigma_max 90, N = 1000 noise levels, snr 0.17,
positional embedding of the level index). Needs CelebA prepared for TFDS (central 140 crop, resized to 64).
"""

from ml_collections import ConfigDict, config_dict


def get_config():
    config = ConfigDict()
    config.name = "celeba_ve_ncsnpp"
    config.seed = 42

    config.data = data = ConfigDict()
    data.dataset = "celeba"
    data.image_size = 64
    data.centered = False
    data.random_flip = True
    data.dequantize = False

    config.sde = sde = ConfigDict()
    sde.name = "vesde"
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01
    sde.sigma_max = 90.0  # about the largest distance between two training images (Song & Ermon, 2020)
    sde.num_scales = 1000

    config.model = model = ConfigDict()
    model.name = "ncsnpp"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.resblock_type = "biggan"
    model.skip_rescale = True
    model.fir = True
    model.progressive = "none"
    model.progressive_input = "residual"
    model.progressive_combine = "sum"
    model.embedding_type = "positional"  # the network sees the level index i, as in the reference
    model.fourier_scale = 16.0
    model.init_scale = 0.0
    model.num_classes = config_dict.placeholder(int)
    model.parameterization = "score"  # the network outputs the score itself
    model.scale_by_sigma = True  # score = output / sigma(t) (Song & Ermon, 2020)
    model.ema_rate = 0.999
    model.dtype = "float32"  # compute dtype: "bfloat16" computes in bf16 from float32 parameters
    model.fir_kernel = (1, 3, 3, 1)

    config.training = training = ConfigDict()
    training.batch_size = 128
    training.n_iters = 1300001
    training.continuous = False  # SMLD: the noise levels sigma_i of the VE SDE's discretisation
    training.reduce_mean = False  # mean over dimensions for VP / sub-VP, sum for VE, as in the reference configs
    training.likelihood_weighting = False
    training.importance_sampling = False
    training.label_dropout = 0.0
    training.log_every = 50
    training.save_every = 10000  # the reference's preemption checkpoints
    training.steps_per_call = 1  # optimiser steps per compiled call (a scan over stacked batches)
    training.keep = 3
    training.progress_bar = True

    config.optim = optim = ConfigDict()
    optim.optimizer = "adam"
    optim.lr = 2e-4
    optim.warmup = 5000
    optim.grad_clip = 1.0
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0

    config.sampling = sampling = ConfigDict()
    sampling.method = "pc"
    sampling.steps = 1000  # N = 1000 reverse steps
    sampling.options = ConfigDict(
        {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.17}
    )  # snr 0.17 for CelebA

    config.eval = ev = ConfigDict()
    ev.enabled = True
    ev.num_samples = 64
    ev.grid_size = 64
    ev.likelihood_examples = 256  # a quick estimate; the paper's Table 2 uses the whole test set
    ev.hutchinson_probes = 1
    ev.ode_tol = 1e-5
    ev.density_grid = 0
    ev.plot_range = (-3.0, 3.0)
    ev.quality = False  # jaxdiff.metrics' classifier is for digits only

    return config
