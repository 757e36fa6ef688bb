"""Evaluate a model's images: the one code path behind `python -m ldm_jax.evaluate` and the
periodic evaluation during training.

A stage says how it makes images from its params (an `ImageMaker`); this module draws them in
fixed-size chunks (one compiled program), computes the requested metrics against the dataset,
and returns flat {name: float} figures.

    samples          fid, kid, is, pr  against the reference split's first `num` images
                     adherence         shapes models conditioned on its labels: `num` images
                                       drawn from the labels of train records (combinations
                                       seen in training) and test records (held-out pairs)
    reconstructions  fid (rFID), kid, pr, is against the originals; psnr, ssim, lpips
                     adherence         shapes data: the reconstructions against the labels of
                                       their originals, and the originals themselves (the
                                       reader's floor on the data, as adherence_data_*)

Adherence figures are named adherence_{group}/{attribute}, group `seen` for images whose
labels hold only colour-shape pairs seen in training and `held_out` for those with a held-out
pair; a group without images is left out.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from ldm_jax.config_checks import ConfigError
from ldm_jax.data import pipeline
from ldm_jax.evaluation import distribution_metrics as dm
from ldm_jax.evaluation.eval_checks import INCEPTION_METRICS, check_metrics, parse_metrics
from ldm_jax.evaluation.reference import reference_features, split_images
from ldm_jax.utils.image_grid import to_uint8


@dataclasses.dataclass(frozen=True)
class ImageMaker:
    """How a stage turns params into images to evaluate (floats in [-1, 1], NHWC).

    kind "samples":         make(params, labels (n, K) int32 or None, n, seed)
    kind "reconstructions": make(params, images (n, H, W, 3) float32)
    """
    kind: str
    make: Callable
    label_keys: tuple = ()
    lpips: Callable | None = None  # (x, y) -> (n,) distances, when LPIPS weights are given
    # records -> what make takes for them (arrays with a leading image axis, in any pytree),
    # e.g. caption tokens; None: their label_keys stacked into (n, K) int32
    conditions: Callable | None = None


def training_evaluator(config, mesh, maker: ImageMaker, params_of: Callable):
    """(state, step) -> (figures, notes) with the config's `eval` section; `params_of(state)`
    picks what the maker's make takes (e.g. the EMA params)."""
    e = config.eval
    evaluator = Evaluator(config, mesh, maker, e.metrics, e.num_samples, e.inception or None,
                          e.reference_split, e.reference_split, e.batch_size)
    return lambda state, step: evaluator(params_of(state), seed=config.seed)


class Evaluator:
    def __init__(self, config, mesh, maker: ImageMaker, metrics, num: int,
                 inception: str | None = None, reference_split: str = "train",
                 eval_split: str = "validation", batch_size: int = 64):
        self.config, self.mesh, self.maker = config, mesh, maker
        self.metrics = parse_metrics(metrics)
        check_metrics(self.metrics, maker.kind, config.data.name, maker.label_keys,
                      has_lpips=maker.lpips is not None)
        if num < 10 and any(m in self.metrics for m in INCEPTION_METRICS):
            raise ConfigError(f"num={num}: Inception metrics need at least 10 images")
        self.num, self.batch_size = num, batch_size
        self.reference_split, self.eval_split = reference_split, eval_split
        self.inception_source = inception
        self._extractor = None
        self._data_adherence = None  # the originals' figures: the same on every call

    @property
    def extractor(self):
        if self._extractor is None:  # loaded (and compiled) on first use only
            from ldm_jax.evaluation.features import InceptionFeatures
            self._extractor = InceptionFeatures(self.mesh, self.inception_source)
        return self._extractor

    def __call__(self, params, seed: int = 0) -> tuple[dict, list]:
        """(figures, notes) for the model `params`."""
        start = time.time()
        if self.maker.kind == "samples":
            results, notes = self._evaluate_samples(params, seed)
        else:
            results, notes = self._evaluate_reconstructions(params)
        results["eval_seconds"] = time.time() - start
        return results, notes

    # -- samples ---------------------------------------------------------------------------
    def _labels(self, split: str, num: int):
        source = pipeline.load_source(self.config.data, split=pipeline.split_name(
            self.config.data, split))
        if num > len(source):
            raise ConfigError(f"asked for {num} images but the {split} split has {len(source)}")
        records = [source[i] for i in range(num)]
        if self.maker.conditions is not None:
            return self.maker.conditions(records), records
        labels = np.stack([pipeline.stack_labels(r, self.maker.label_keys) for r in records])
        return labels, records

    def _draw(self, params, labels, num: int, seed: int) -> np.ndarray:
        """`num` samples in chunks of batch_size (the last padded), uint8."""
        chunks = []
        for i, start in enumerate(range(0, num, self.batch_size)):
            n = min(self.batch_size, num - start)
            part = None
            if labels is not None:
                pad = self.batch_size - n
                part = jax.tree_util.tree_map(
                    lambda a: np.concatenate([a[start:start + n],
                                              np.repeat(a[start + n - 1:start + n], pad, 0)]),
                    labels)
            images = self.maker.make(params, part, self.batch_size, seed * 100_003 + i)
            chunks.append(to_uint8(np.asarray(images)[:n]))
        return np.concatenate(chunks)

    def _evaluate_samples(self, params, seed):
        results, notes = {}, []
        wanted = [m for m in self.metrics if m in INCEPTION_METRICS]
        if wanted:
            labels = (self._labels(self.reference_split, self.num)[0]
                      if self.maker.label_keys else None)
            fake = self.extractor(self._draw(params, labels, self.num, seed))
            real, note = reference_features(self.config.data, self.reference_split, self.num,
                                            self.extractor)
            notes.append(note)
            results.update(inception_metrics(wanted, real, fake))
        if "adherence" in self.metrics:
            results.update(self._adherence(params, seed + 1))
        return results, notes

    def _adherence(self, params, seed) -> dict:
        # Train records hold only seen pairs and test records a held-out one each, so the
        # two halves are the checker's two groups.
        half = self.num // 2
        images, records = [], []
        for split, n in (("train", half), ("test", self.num - half)):
            if n:
                labels, split_records = self._labels(split, n)
                images.append(self._draw(params, labels, n, seed))
                records += split_records
        return adherence_figures(np.concatenate(images), records,
                                 _conditioned_attributes(self.maker.label_keys))

    # -- reconstructions -------------------------------------------------------------------
    def _evaluate_reconstructions(self, params):
        name = pipeline.split_name(self.config.data, self.eval_split)
        source = pipeline.load_source(self.config.data, split=name)
        originals = split_images(source, self.num)
        recon = self._reconstruct(params, originals)
        results, notes = self._paired_metrics(originals, recon), []
        wanted = [m for m in self.metrics if m in INCEPTION_METRICS]
        if wanted:
            real, note = reference_features(self.config.data, self.eval_split, self.num,
                                            self.extractor)
            notes.append(note)
            found = inception_metrics(wanted, real, self.extractor(recon))
            results.update({("rfid" if k == "fid" else k): v for k, v in found.items()})
        if "adherence" in self.metrics:
            records = [source[i] for i in range(self.num)]
            results.update(adherence_figures(recon, records))
            if self._data_adherence is None:
                self._data_adherence = adherence_figures(originals, records,
                                                         name="adherence_data")
            results.update(self._data_adherence)
        return results, notes

    def _paired_metrics(self, originals, recon) -> dict:
        """The mean psnr, ssim and lpips asked for, of uint8 reconstructions and originals."""
        from ldm_jax.evaluation.image_metrics import psnr, ssim
        x = originals.astype(np.float32) / 127.5 - 1
        y = recon.astype(np.float32) / 127.5 - 1
        b, out = self.batch_size, {}
        for metric, fn in (("psnr", psnr), ("ssim", ssim), ("lpips", self.maker.lpips)):
            if metric in self.metrics:
                out[metric] = float(np.mean(np.concatenate([
                    np.asarray(fn(x[s:s + b], y[s:s + b])) for s in range(0, self.num, b)])))
        return out

    def _reconstruct(self, params, originals) -> np.ndarray:
        """uint8 reconstructions of uint8 `originals`, in batches of batch_size (the last
        padded, so one program serves every batch)."""
        recon = []
        for start in range(0, self.num, self.batch_size):
            x = originals[start:start + self.batch_size].astype(np.float32) / 127.5 - 1
            n = len(x)
            if n < self.batch_size:
                x = np.concatenate([x, np.repeat(x[-1:], self.batch_size - n, 0)])
            recon.append(to_uint8(np.asarray(self.maker.make(params, x))[:n]))
        return np.concatenate(recon)


def inception_metrics(wanted, real: dict, fake: dict) -> dict:
    out = {}
    if "fid" in wanted:
        out["fid"] = dm.fid(real["pool"], fake["pool"])
    if "kid" in wanted:
        out["kid"], out["kid_std"] = dm.kernel_inception_distance(real["pool"], fake["pool"])
    if "pr" in wanted:
        out["precision"], out["recall"] = dm.precision_recall(real["pool"], fake["pool"])
    if "is" in wanted:
        if "logits_unbiased" not in fake:
            raise ConfigError("the Inception Score needs the classifier head, which these "
                              "Inception weights do not carry; drop 'is' or pass weights "
                              "with it (--inception)")
        out["is"], out["is_std"] = dm.inception_score(fake["logits_unbiased"])
    return out


def adherence_figures(images, records, attributes=None, name: str = "adherence") -> dict:
    """The shapes checker on uint8 `images` against the labels of `records` (one each):
    {f"{name}_{group}/{attribute}": fraction right} for the groups `seen` and `held_out`
    that have images; `attributes` default to all of them."""
    from ldm_jax.evaluation import shapes_adherence, shapes_reader
    groups = shapes_adherence.adherence_by_group(shapes_reader.read_scenes(images), records)
    attributes = shapes_adherence.ATTRIBUTES if attributes is None else attributes
    return {f"{name}_{group}/{a}": scores[a] for group, scores in groups.items() if scores["n"]
            for a in attributes}


_OBJECT_ATTRIBUTES = ("color", "shape", "size", "position")


def _conditioned_attributes(label_keys) -> list:
    """The attributes a model conditioned on `label_keys` is asked to show."""
    keys = set(label_keys)
    names = [a for a in ("background", "num_objects") if a in keys]
    names += [a for a in _OBJECT_ATTRIBUTES if f"{a}_0" in keys]
    if len(names) == 2 + len(_OBJECT_ATTRIBUTES) and all(f"{a}_1" in keys
                                                         for a in _OBJECT_ATTRIBUTES):
        names.append("all")
    return names

