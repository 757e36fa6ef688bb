"""Class-conditional latent diffusion on the embedded 64x64 shapes dataset: the class is the
first object's shape (circle, square, triangle, diamond, cross).

COMMAND: python train.py --config=configs/ldm_kl8_class.py
         python sample.py --workdir=workdirs/ldm_kl8_class --class=triangle --class=cross
The class embedding is added to the time embedding (ADM-style); 10% of the examples are
trained without it, for classifier-free guidance. Needs the first stage of ldm_kl8.
"""
from configs import ldm_kl8


def get_config():
    config = ldm_kl8.get_config()
    config.conditioning.text = False
    config.model.label_keys = ("shape_0",)
    config.model.attention_levels = (1,)  # self-attention only: nothing to cross-attend to
    return config
