"""Which metrics apply to which model, checked from the config before anything runs."""
from __future__ import annotations

from ldm_jax.config_checks import ConfigError, at_least, one_of

INCEPTION_METRICS = ("fid", "kid", "is", "pr")
PAIRED_METRICS = ("psnr", "ssim", "lpips")  # reconstructions against their originals
METRICS = INCEPTION_METRICS + ("adherence",) + PAIRED_METRICS


def parse_metrics(text) -> tuple:
    """"fid,kid" or a tuple of names -> the tuple; unknown names are a ConfigError."""
    names = tuple(m.strip() for m in (text.split(",") if isinstance(text, str) else text)
                  if m.strip())
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ConfigError(f"unknown metric(s) {unknown or text!r}; choose from "
                          f"{', '.join(METRICS)}")
    return names


def check_metrics(metrics, kind: str, data_name: str, label_keys=(), has_lpips=True) -> None:
    """`kind`: "samples" (diffusion stages) or "reconstructions" (autoencoders)."""
    if kind == "samples":
        paired = [m for m in metrics if m in PAIRED_METRICS]
        if paired:
            raise ConfigError(f"{', '.join(paired)} compare reconstructions with their "
                              "originals: they apply to autoencoder workdirs only")
    if "adherence" in metrics:
        if data_name != "shapes":
            raise ConfigError("adherence judges images of the shapes dataset against their "
                              "labels: it needs a model trained on data.name='shapes' (this "
                              f"one: {data_name!r}); drop adherence from the metrics")
        if kind == "samples" and not label_keys:
            raise ConfigError("adherence needs a model conditioned on the shapes labels "
                              "(model.label_keys); this one is unconditional")
    if "lpips" in metrics and not has_lpips:
        raise ConfigError("lpips needs the LPIPS weights: pass --lpips=PATH or set "
                          "loss.lpips_path (converted with `python -m "
                          "ldm_jax.convert.lpips_weights`)")


def check_eval_config(config, kind: str) -> None:
    """The config's `eval` section (evaluation during training)."""
    e = config.eval
    at_least(e.every, 0, "eval.every", "steps between evaluations (0: none)")
    if not e.every:
        return
    metrics = parse_metrics(e.metrics)
    if any(m in INCEPTION_METRICS for m in metrics):
        at_least(e.num_samples, 10, "eval.num_samples", "images for Inception metrics")
    at_least(e.num_samples, 1, "eval.num_samples", "images per evaluation")
    at_least(e.batch_size, 1, "eval.batch_size", "images per batch")
    one_of(e.reference_split, ("train", "validation", "test"), "eval.reference_split")
    lpips = bool(config.get("loss", {}).get("lpips_path", "")) if kind != "samples" else False
    check_metrics(metrics, kind, config.data.name, tuple(config.model.get("label_keys", ())),
                  has_lpips=lpips)
