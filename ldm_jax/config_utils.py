"""Which stage a config names, and the copy of the resolved config kept in every workdir.

Stages are looked up by name and imported only when used, so loading a workdir imports the
code of its own stage alone.
"""
from __future__ import annotations

import importlib
import json
import os

import ml_collections

from ldm_jax.config_checks import ConfigError, check_batch_divides  # noqa: F401 (re-exported)

CONFIG_FILE = "config.json"
# config.stage -> the module implementing it (see ldm_jax/stages/api.py)
STAGES = {
    "ddpm": "ldm_jax.stages.ddpm",
    "autoencoder": "ldm_jax.stages.autoencoder",
    "ldm": "ldm_jax.stages.ldm",
}


def stage_module(name: str):
    if name not in STAGES:
        raise ConfigError(f"stage={name!r} is not one of {list(STAGES)}")
    return importlib.import_module(STAGES[name])


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject configs that would fail later with an obscure trace, naming the field to change."""
    stage_module(config.stage).validate(config)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written config
    return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist; pass the --workdir of a "
                                "train.py run")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in workdir {workdir!r}: is this the --workdir "
                                "a train.py run wrote to?")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(_corrupt_config(workdir, path, f"is not valid JSON ({e})")) from None
    if not isinstance(saved, dict):
        raise ConfigError(_corrupt_config(workdir, path, f"holds a {type(saved).__name__}, "
                                          "not a JSON object"))
    return config_from_dict(saved)


def _corrupt_config(workdir: str, path: str, what: str) -> str:
    """The message for a damaged WORKDIR/config.json: where an intact copy is (every checkpoint
    holds one, written by Checkpointer.save as the item "config")."""
    from ldm_jax.checkpoint import CHECKPOINT_DIR
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    steps = sorted(int(d) for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else ())
                   if d.isdigit() and os.path.isfile(os.path.join(ckpt_dir, d, "config", "metadata")))
    copy = os.path.join(ckpt_dir, str(steps[-1]) if steps else "STEP", "config", "metadata")
    return f"{path} {what}; restore it from the copy {copy}, or use another --workdir"


def _merge(defaults: dict, saved: dict) -> dict:
    out = dict(defaults)
    for key, value in saved.items():
        out[key] = (_merge(defaults[key], value)
                    if isinstance(value, dict) and isinstance(defaults.get(key), dict) else value)
    return out


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A stored config dict with the fields added since it was written set to their stage's
    defaults, which keep the old behaviour (workdirs from before `stage` existed are DDPM),
    or to the old behaviour where the default changed it (training.ema_warmup)."""
    defaults = stage_module(saved.get("stage", "ddpm")).default_config()
    merged = _merge(defaults.to_dict(), saved)
    if "ema_warmup" not in saved.get("training", {}):
        merged["training"]["ema_warmup"] = "none"  # its EMA was trained with a fixed decay
    model = merged.get("model")
    if isinstance(model, dict) and isinstance(model.get("remat"), bool):
        from ldm_jax.models.remat import from_legacy  # model.remat was a bool before policies
        model["remat"] = from_legacy(model["remat"])
    return ml_collections.ConfigDict(merged)
