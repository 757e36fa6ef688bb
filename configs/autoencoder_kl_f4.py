"""LDM's kl-f4 first stage (models/first_stage_models/kl-f4): f=4, 3 latent channels.

COMMAND: python train.py --config=configs/autoencoder_kl_f4.py --workdir=workdirs/kl_f4 \
    --config.data.name=... --config.loss.lpips_path=lpips.safetensors
256x256 images give latents of 64x64x3. LDM trained its first stages on OpenImages on GPUs;
the loss settings here are the released config's.
"""
from configs import autoencoder_base


def get_config():
    config = autoencoder_base.get_config()
    config.data.image_size = 256
    # Until real image sources land, the embedded shapes stand in (rendered at 256 px).
    config.data.num_train = 5000
    config.model.kind = "kl"
    config.model.z_channels = 3
    config.model.embed_dim = 3
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = ()
    config.loss.disc_start = 50001
    config.loss.kl_weight = 1e-6
    config.loss.disc_weight = 0.5
    return config
