"""The DDPM paper's CIFAR-10 recipe (Ho et al. 2020): 35.7M-parameter U-Net, eps prediction.

COMMAND: python train.py --config=configs/ddpm_cifar10.py --workdir=workdirs/ddpm_cifar10
Needs CIFAR-10 prepared by tfds in array_record format under data.data_dir, e.g.
  tfds build cifar10 --data_dir=~/tensorflow_datasets --file_format=array_record
(preparing needs the internet once; training never downloads). The paper trains 800k steps of
batch 128 on TPU v3-8 (~10.6 h); on one modern GPU expect a few days in float32.
"""
from configs import ddpm_base


def get_config():
    config = ddpm_base.get_config()
    config.data.name = "tfds"  # older workdirs say "cifar10", a shorthand for these four
    config.data.tfds_name = "cifar10"
    config.data.image_key = "image"
    config.data.label_key = "label"
    config.data.image_size = 32
    config.data.random_flip = True
    # Model, diffusion and optimiser defaults in ddpm_base are the paper's CIFAR-10 settings:
    # ch 128, mult (1,2,2,2), 2 res blocks, attention at 16x16, dropout 0.1, Adam 2e-4,
    # warm-up 5000, clip 1.0, T=1000 linear betas 1e-4..0.02, batch 128, EMA 0.9999.
    config.training.sample_every = 20_000
    return config
