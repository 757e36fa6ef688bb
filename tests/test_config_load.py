"""A workdir written before a config field existed still loads, with that field's default."""
import json

from configs import ddpm_base, ddpm_shapes
from ldm_jax import config_utils


def test_old_workdir_config_gains_new_fields_with_defaults(tmp_path):
    config = ddpm_shapes.get_config()
    path = config_utils.save_config(config, str(tmp_path))
    with open(path) as f:
        saved = json.load(f)
    del saved["model"]["label_keys"], saved["sampling"]["guidance_scale"]
    saved["model"]["base_channels"] = 64  # a saved value wins over the default
    with open(path, "w") as f:
        json.dump(saved, f)
    loaded = config_utils.load_config(str(tmp_path))
    assert tuple(loaded.model.label_keys) == tuple(ddpm_base.get_config().model.label_keys) == ()
    assert loaded.sampling.guidance_scale == 1.0
    assert loaded.model.base_channels == 64
    assert loaded.diffusion.schedule == "cosine"  # ddpm_shapes' value, not the base's "linear"
    config_utils.validate(loaded)
