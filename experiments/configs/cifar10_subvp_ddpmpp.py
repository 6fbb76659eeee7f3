"""CIFAR-10, DDPM++ cont., sub-VP SDE: the score-SDE paper's configuration (61.8M parameters).

    python experiments/train.py --config experiments/configs/cifar10_subvp_ddpmpp.py --workdir runs/cifar10

Hyper-parameters of the reference configuration
(yang-song/score_sde, configs/subvp/cifar10_ddpmpp_continuous.py): continuous-time training,
batch 128, Adam 2e-4 with 5k warm-up steps, gradient clipping at 1, EMA 0.9999, 1.3M steps.
Needs CIFAR-10 prepared for TFDS (``tfds build cifar10 --file_format=array_record``) and accelerators;
the batch is split over every device.
"""

from ml_collections import ConfigDict, config_dict


def get_config():
    config = ConfigDict()
    config.name = "cifar10_subvp_ddpmpp"
    config.seed = 42

    config.data = data = ConfigDict()
    data.dataset = "cifar10"
    data.image_size = config_dict.placeholder(int)
    data.centered = True  # [-1, 1] for VP / sub-VP
    data.random_flip = True
    data.dequantize = False

    config.sde = sde = ConfigDict()
    sde.name = "subvpsde"
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01
    sde.sigma_max = 50.0  # VE only
    sde.num_scales = 1000

    config.model = model = ConfigDict()
    model.name = "ddpmpp"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.resblock_type = "biggan"
    model.skip_rescale = True
    model.fir = False
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.embedding_type = "positional"
    model.fourier_scale = 16.0
    model.init_scale = 0.0
    model.num_classes = config_dict.placeholder(int)
    model.parameterization = "eps"  # the network predicts the noise: score = -output / sigma(t)
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.dtype = "float32"  # compute dtype: "bfloat16" computes in bf16 from float32 parameters

    config.training = training = ConfigDict()
    training.batch_size = 128
    training.n_iters = 1300001
    training.continuous = True
    training.reduce_mean = True  # mean over dimensions for VP / sub-VP, sum for VE, as in the reference configs
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
        {"predictor": "euler_maruyama", "corrector": config_dict.placeholder(str), "snr": 0.16}
    )

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
