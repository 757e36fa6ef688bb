"""Stable Diffusion v2 (CompVis v2-inference-v.yaml, the 768x768 v-prediction model).

COMMAND: python -m ldm_jax.convert SD2_FOLDER_OR_CKPT workdirs/sd_v2
         python sample.py --workdir=workdirs/sd_v2 --prompt=...
Differences from configs/sd_v1.py: v-prediction; heads of 64 channels (5, 10, 20 heads);
linear projections into and out of the transformers; context 1024 from OpenCLIP ViT-H/14's
text transformer (24 layers, width 1024, 16 heads, gelu), read at its penultimate layer.
A diffusers SD 2 folder stores that encoder with its last layer already removed (23 layers,
last hidden state): the converter sets depth and output from the weights it reads. The
512x512 eps-prediction SD 2 base model is this config with
--config.diffusion.parameterization=eps --config.data.image_size=512.
SD 2.1 needs its attention scores in float32 (diffusers' upcast_attention): here they always
are, in bfloat16 runs too (ldm_jax/models/transformer.py), so there is no switch for it.
"""
from configs import sd_v1


def get_config():
    config = sd_v1.get_config()
    config.data.image_size = 768
    config.diffusion.parameterization = "v"

    config.text_encoder.width = 1024
    config.text_encoder.depth = 24
    config.text_encoder.heads = 16
    config.text_encoder.output = "penultimate"

    config.model.num_heads = 1  # unused: head_dim sets the heads
    config.model.head_dim = 64
    config.model.use_linear_projection = True
    return config
