"""A pixel-space DDPM on your own folder of images, class-conditional when the folder has class
sub-folders.

COMMAND: python train.py --config=configs/ddpm_folder.py --workdir=workdirs/my_folder \
             --config.data.path=~/data/pets --config.data.image_size=64 \
             --config.model.label_keys="('label',)"          # class sub-folders: conditional
         python sample.py --workdir=workdirs/my_folder --class=cat --class=dog --num=8
Images (PNG, JPEG, WebP; any size or mode) are resized so the shorter side is data.image_size
and centre-cropped (data.crop=random for random crops). Class names are the sub-folder names,
kept in the workdir's config. Without label_keys the model is unconditional. Files that cannot
be decoded are skipped, replaced by the next readable one, and counted in the log.
"""
from configs import ddpm_base


def get_config():
    config = ddpm_base.get_config()
    config.data.name = "folder"
    config.data.path = "data/images"  # your folder: --config.data.path=DIR
    config.data.image_size = 64
    config.data.random_flip = True
    config.data.num_threads = 4      # decoding JPEGs is the input pipeline's work

    config.model.base_channels = 64
    config.model.channel_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.label_keys = ()

    config.optimizer.lr = 2e-4
    config.optimizer.warmup_steps = 1000
    config.training.batch_size = 64
    config.training.num_steps = 100_000
    # ~10,000-step window once reached; the compvis warm-up reaches 0.9999 after ~90,000 of
    # the 100,000 steps and until then averages the last ~n/10 steps.
    config.training.ema_decay = 0.9999
    config.training.label_drop_prob = 0.1
    config.training.checkpoint_every = 5000
    config.training.sample_every = 5000
    config.training.num_samples = 16
    config.sampling.sampler = "ddim"
    config.sampling.num_steps = 50
    config.sampling.guidance_scale = 1.0  # raise it (e.g. 3) for a class-conditional model
    return config
