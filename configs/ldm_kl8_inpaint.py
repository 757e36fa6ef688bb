"""Text-conditioned inpainting on the embedded 64x64 shapes dataset (SD-inpainting style).

COMMAND: python train.py --config=configs/ldm_kl8_inpaint.py
         python sample.py --workdir=workdirs/ldm_kl8_inpaint --split=test
         python sample.py --workdir=workdirs/ldm_kl8_inpaint --init_image=IN.png --mask=MASK.png \
             --prompt="a large blue square in the center on a white background"
The U-Net sees, besides the noisy latents, the mask at latent resolution and the latents of
the masked image (4 + 1 + 4 input channels). Training masks are random boxes, a quarter of
them the whole image; without --mask, sampling repaints a centred box.
"""
from configs import ldm_kl8


def get_config():
    config = ldm_kl8.get_config()
    config.conditioning.concat = "inpaint"
    return config
