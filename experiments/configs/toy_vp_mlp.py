"""Two moons (2-D) with an MLP score network and the VP SDE; about a minute on a CPU.

    python experiments/train.py --config experiments/configs/toy_vp_mlp.py --workdir runs/toy

Instead of an image grid, ``samples.png`` shows samples over the data and the model's density from the
probability-flow ODE (exact trace in 2-D); ``summary.json`` has the test negative log-likelihood in nats.
"""

from ml_collections import ConfigDict, config_dict


def get_config():
    config = ConfigDict()
    config.name = "toy_vp_mlp"
    config.seed = 0

    config.data = data = ConfigDict()
    data.dataset = "two_moons"  # or gaussian_grid, checkerboard, swiss_roll, rings
    data.image_size = config_dict.placeholder(int)  # images only
    data.centered = True  # toy sets come in their own coordinates (about [-2, 2]) and ignore this
    data.random_flip = False
    data.dequantize = False

    config.sde = sde = ConfigDict()
    sde.name = "vpsde"
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01  # VE only
    sde.sigma_max = 5.0  # VE only: about the largest distance between two data points
    sde.num_scales = 1000

    config.model = model = ConfigDict()
    model.name = "mlp"
    model.hidden_sizes = (128, 128, 128)
    model.embedding_size = 32
    model.embedding_type = "positional"  # noise input 999 t, as for DDPM++
    model.dropout = 0.0
    model.num_classes = config_dict.placeholder(int)  # e.g. 2 for class-conditional two moons
    model.parameterization = "eps"  # the network predicts the noise; score = -eps / sigma
    model.scale_by_sigma = False
    model.ema_rate = 0.999
    model.dtype = "float32"  # compute dtype: "bfloat16" computes in bf16 from float32 parameters

    config.training = training = ConfigDict()
    training.batch_size = 256
    training.n_iters = 3000
    training.continuous = True
    training.reduce_mean = False
    training.likelihood_weighting = False
    training.importance_sampling = False
    training.label_dropout = 0.0  # > 0 with num_classes trains for classifier-free guidance
    training.log_every = 100
    training.save_every = 1000
    training.steps_per_call = 1  # optimiser steps per compiled call (a scan over stacked batches)
    training.keep = 2
    training.progress_bar = True

    config.optim = optim = ConfigDict()
    optim.optimizer = "adam"
    optim.lr = 2e-3
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
    ev.num_samples = 2000
    ev.grid_size = 64  # images only
    ev.likelihood_examples = 1000
    ev.hutchinson_probes = 1  # images only; 2-D toys use the exact trace
    ev.ode_tol = 1e-5
    ev.density_grid = 64  # points per side of the density plot (0: no density panel)
    ev.plot_range = (-3.5, 3.5)  # two moons spans [-3, 3] x [-2, 2]
    ev.quality = False  # FID/KID need an image classifier
    return config
