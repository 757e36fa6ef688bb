"""The ddpm_shapes recipe conditioned on all ten scene labels, sampled with classifier-free
guidance: the pixel-space model whose samples the adherence metric judges.

COMMAND: python train.py --config=configs/ddpm_shapes_labels.py --workdir=workdirs/shapes_labels
         python -m ldm_jax.evaluate --workdir=workdirs/shapes_labels --metrics=fid,adherence
Each label (background, object count, and per object colour, shape, size and grid cell) gets an
embedding added to the time embedding; 10% of training images drop all labels, so the sampler
can mix conditional and unconditional predictions (guidance 3).
"""
from configs import ddpm_shapes
from ldm_jax.data.shapes import LABEL_KEYS


def get_config():
    config = ddpm_shapes.get_config()
    config.model.label_keys = LABEL_KEYS
    config.training.label_drop_prob = 0.1
    config.sampling.guidance_scale = 3.0
    return config
