"""28x28 MNIST with a DDPM++ of three resolutions and the VP SDE: minutes on an accelerator, hours on a CPU.

    tfds build mnist --file_format=array_record     # once, where TFDS_DATA_DIR points
    python experiments/train.py --config experiments/configs/mnist_vp_ddpmpp.py --workdir runs/mnist

Nothing is downloaded at run time: the data set must be prepared for TFDS first (``tfds.data_source``, no
TensorFlow). Bits/dim are reported for the 256 grey levels.
"""

from ml_collections import ConfigDict, config_dict


def get_config():
    config = ConfigDict()
    config.name = "mnist_vp_ddpmpp"
    config.seed = 0

    config.data = data = ConfigDict()
    data.dataset = "mnist"
    data.image_size = config_dict.placeholder(int)  # native 28x28
    data.centered = True  # [-1, 1], as for the VP SDE in the paper
    data.random_flip = False  # digits are not mirror-symmetric
    data.dequantize = False

    config.sde = sde = ConfigDict()
    sde.name = "vpsde"
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01  # VE only
    sde.sigma_max = 15.0  # VE only
    sde.num_scales = 1000

    config.model = model = ConfigDict()
    model.name = "ddpmpp"
    model.nf = 64
    model.ch_mult = (1, 2, 2)  # 28 -> 14 -> 7
    model.num_res_blocks = 2
    model.attn_resolutions = (14,)
    model.dropout = 0.1
    model.resblock_type = "biggan"
    model.skip_rescale = True
    model.embedding_type = "positional"
    model.init_scale = 0.0
    model.num_classes = config_dict.placeholder(int)  # 10 for class-conditional
    model.parameterization = "eps"
    model.scale_by_sigma = False
    model.ema_rate = 0.999
    model.dtype = "float32"  # compute dtype: "bfloat16" computes in bf16 from float32 parameters

    config.training = training = ConfigDict()
    training.batch_size = 128
    training.n_iters = 50000
    training.continuous = True
    training.reduce_mean = True
    training.likelihood_weighting = False
    training.importance_sampling = False
    training.label_dropout = 0.0  # > 0 with num_classes trains for classifier-free guidance
    training.log_every = 100
    training.save_every = 5000
    training.steps_per_call = 1  # optimiser steps per compiled call (a scan over stacked batches)
    training.keep = 2
    training.progress_bar = True

    config.optim = optim = ConfigDict()
    optim.optimizer = "adam"
    optim.lr = 2e-4
    optim.warmup = 1000
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
    ev.num_samples = 100
    ev.grid_size = 100  # images only
    ev.likelihood_examples = 256
    ev.hutchinson_probes = 1
    ev.ode_tol = 1e-4  # ODE rtol = atol; the paper's 1e-5 costs 2.5x the NFE on digits for bits/dim within 1e-3
    ev.density_grid = 0  # 2-D toys only
    ev.plot_range = (-3.0, 3.0)  # 2-D toys only
    ev.quality = False  # jaxdiff.metrics' classifier is for 8x8 digits
    return config
