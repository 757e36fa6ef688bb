"""4x super-resolution in latent space on the embedded shapes dataset: 16x16 -> 64x64.

COMMAND: python train.py --config=configs/ldm_kl8_sr.py
         python sample.py --workdir=workdirs/ldm_kl8_sr --split=test
         python sample.py --workdir=workdirs/ldm_kl8_sr --init_image=SMALL.png
The low-resolution image (block means of the 64x64 original) is concatenated to the 8x8x4
latents as 12 channels (each 2x2 block of its pixels stacked), so no pixel is lost to the
smaller latent grid. Unconditional otherwise (no text).
"""
from configs import ldm_kl8


def get_config():
    config = ldm_kl8.get_config()
    config.conditioning.text = False
    config.conditioning.concat = "lowres"
    config.conditioning.p_uncond = 0.0
    config.model.attention_levels = (1,)
    config.sampling.guidance_scale = 1.0
    return config
