"""LDM's kl-f8 first stage (models/first_stage_models/kl-f8): f=8, 4 latent channels.

COMMAND: python train.py --config=configs/autoencoder_kl_f8.py --workdir=workdirs/kl_f8 \
    --config.data.name=... --config.loss.lpips_path=lpips.safetensors
256x256 images give latents of 32x32x4. LDM trained its first stages on OpenImages on GPUs;
the loss settings here are the released config's.
"""
from configs import autoencoder_base


def get_config():
    config = autoencoder_base.get_config()
    config.data.image_size = 256
    # Until real image sources land, the embedded shapes stand in (rendered at 256 px).
    config.data.num_train = 5000
    config.model.kind = "kl"
    config.model.z_channels = 4
    config.model.embed_dim = 4
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 4, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = ()
    config.loss.disc_start = 50001
    config.loss.kl_weight = 1e-6
    config.loss.disc_weight = 0.5
    return config
