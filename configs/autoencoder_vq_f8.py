"""LDM's vq-f8 first stage (models/first_stage_models/vq-f8): f=8, 16384 codes of dimension 4,
attention at 32x32; 256x256 images give 32x32x4 latents. The architecture is the released
vq-f8 one; the loss settings are those of the vq-f4 release.

COMMAND: python train.py --config=configs/autoencoder_vq_f8.py --workdir=workdirs/vq_f8 \
    --config.loss.lpips_path=lpips.safetensors
"""
from configs import autoencoder_base


def get_config():
    return autoencoder_base.ldm_first_stage("vq", 4, (1, 2, 2, 4), (32,), n_embed=16384)
