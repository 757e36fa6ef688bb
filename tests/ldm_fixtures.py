"""Shared tiny latent-diffusion setups: a 2-step f=2 autoencoder on 32px shapes, and the
ldm_kl8 config shrunk to match it (16x16x4 latents)."""
from __future__ import annotations

from conftest import set_fields

TINY_LDM = {
    "data.image_size": 32,
    "data.num_train": 64,
    "text_encoder.width": 32,
    "text_encoder.depth": 1,
    "text_encoder.heads": 2,
    "text_encoder.max_length": 24,
    "model.base_channels": 16,
    "model.channel_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.attention_levels": (1,),
    "model.num_heads": 2,
    "model.norm_groups": 8,
    "optimizer.warmup_steps": 0,
    "optimizer.schedule": "constant",
    "training.batch_size": 8,
    "training.num_steps": 4,
    "training.log_every": 1,
    "training.checkpoint_every": 2,
    "training.sample_every": 0,
    "training.num_samples": 4,
    "training.progress_bar": False,
    "sampling.num_steps": 3,
}


def tiny_ldm_config(data_dir: str, first_stage: str, base: str = "ldm_kl8", **overrides):
    import importlib
    config = importlib.import_module(f"configs.{base}").get_config()
    items = {**TINY_LDM, "data.data_dir": data_dir, "first_stage.workdir": first_stage,
             **overrides}
    return set_fields(config, items)


def tiny_ldm_cli_args(data_dir: str, first_stage: str, **overrides) -> list:
    def render(v):
        return str(v).replace(" ", "") if isinstance(v, tuple) else str(v)
    items = {**TINY_LDM, "data.data_dir": data_dir, "first_stage.workdir": first_stage,
             **overrides}
    return [f"--config.{k}={render(v)}" for k, v in items.items()]
