"""Classifier-free guidance arithmetic: plain guidance, and guidance rescale (Lin et al. 2023)
against diffusers' formula in torch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.diffusion.guidance import combine


def rescale_noise_cfg(guided, cond, guidance_rescale):
    """diffusers' rescale (its pipeline module needs transformers, so it is restated here in
    torch, with torch's unbiased std over every non-batch axis as diffusers computes it)."""
    dims = list(range(1, cond.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guidance_rescale * guided * ratio + (1 - guidance_rescale) * guided


def _outputs(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return (jax.random.normal(k1, (3, 8, 8, 4)), 0.7 * jax.random.normal(k2, (3, 8, 8, 4)))


def test_scale_one_is_the_conditional_model_and_rescale_zero_is_plain_guidance():
    cond, uncond = _outputs()
    np.testing.assert_allclose(combine(cond, uncond, 1.0), cond, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(combine(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rescale", [0.3, 0.7, 1.0])
def test_guidance_rescale_matches_the_torch_formula(rescale):
    cond, uncond = _outputs(1)
    scale = 6.0
    guided = uncond + scale * (cond - uncond)
    # diffusers works in NCHW; the per-sample std is over all non-batch axes either way.
    theirs = rescale_noise_cfg(torch.from_numpy(np.asarray(guided).transpose(0, 3, 1, 2)),
                               torch.from_numpy(np.asarray(cond).transpose(0, 3, 1, 2)),
                               guidance_rescale=rescale).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(combine(cond, uncond, scale, rescale), theirs, rtol=1e-5,
                               atol=1e-5)
    if rescale == 1.0:  # fully rescaled: each sample has the conditional output's spread
        np.testing.assert_allclose(jnp.std(combine(cond, uncond, scale, 1.0), axis=(1, 2, 3)),
                                   jnp.std(cond, axis=(1, 2, 3)), rtol=1e-5)


def test_sampling_config_checks(shapes_data_dir):
    from conftest import tiny_config
    from ldm_jax import config_utils
    from ldm_jax.config_checks import ConfigError
    with pytest.raises(ConfigError, match="guidance_rescale"):
        config_utils.validate(tiny_config(shapes_data_dir, **{"sampling.guidance_rescale": 1.5}))
