"""Evaluation plumbing: cached reference features, metric/model checks, the shapes checker on
autoencoder reconstructions, FID/KID from real Inception features against SciPy, and the
evaluate command on a tiny trained workdir."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

from conftest import ROOT, tensorboard_steps, tiny_config
from ldm_jax.config_checks import ConfigError
from ldm_jax.data import shapes_tfds
from ldm_jax.evaluation import eval_checks, reference


class CountingExtractor:
    """Stands in for the Inception network where only the caching is under test."""

    def __init__(self, network_id="net-a"):
        self.network_id, self.calls = network_id, 0

    def __call__(self, images):
        self.calls += 1
        return {"pool": images.reshape(len(images), -1)[:, :8].astype(np.float32)}


def test_reference_features_are_cached_and_recomputed_when_the_data_change(
        tmp_path, monkeypatch, shapes_data_dir):
    monkeypatch.setenv("LDM_JAX_CACHE", str(tmp_path / "cache"))
    config = tiny_config(shapes_data_dir)
    net = CountingExtractor()
    first, note = reference.reference_features(config.data, "train", 12, net)
    assert net.calls == 1 and "computed" in note
    again, note = reference.reference_features(config.data, "train", 12, net)
    assert net.calls == 1 and "read from" in note
    np.testing.assert_array_equal(first["pool"], again["pool"])

    reference.reference_features(config.data, "validation", 12, net)  # another split
    reference.reference_features(config.data, "train", 10, net)  # another count
    reference.reference_features(config.data, "train", 12, CountingExtractor("net-b"))
    assert net.calls == 3
    # The same config fields over a regenerated dataset (another seed, hence other pixels).
    other_dir = str(tmp_path / "tfds")
    shapes_tfds.prepare_shapes(other_dir, image_size=32, num_train=64, seed=1)
    config.data.data_dir = other_dir
    monkeypatch.setattr(shapes_tfds, "shapes_data_source",
                        _with_seed(shapes_tfds.shapes_data_source, 1))
    changed, _ = reference.reference_features(config.data, "train", 12, net)
    assert net.calls == 4 and not np.array_equal(changed["pool"], first["pool"])


def _with_seed(fn, seed):
    return lambda *a, **k: fn(*a, **{**k, "seed": seed})


@pytest.mark.parametrize("metrics,kind,data,labels,message", [
    ("fid,sharpness", "samples", "shapes", (), "unknown metric"),
    ("psnr", "samples", "shapes", (), "autoencoder workdirs only"),
    ("adherence", "samples", "shapes", (), "unconditional"),
    ("adherence", "samples", "tfds", ("label",), "data.name='shapes' .this one: 'tfds'.; drop"),
    ("adherence", "reconstructions", "folder", (), "data.name='shapes' .this one: 'folder'.; drop"),
])
def test_metrics_that_cannot_apply_are_refused(metrics, kind, data, labels, message):
    with pytest.raises(ConfigError, match=message):
        eval_checks.check_metrics(eval_checks.parse_metrics(metrics), kind, data, labels)
    # An autoencoder of the shapes data needs no labels: its originals carry them.
    eval_checks.check_metrics(("adherence",), "reconstructions", "shapes")


def test_eval_config_is_checked_with_the_training_config(shapes_data_dir):
    from ldm_jax import config_utils
    config = tiny_config(shapes_data_dir, **{"eval.every": 5, "eval.metrics": ("adherence",)})
    with pytest.raises(ConfigError, match="unconditional"):
        config_utils.validate(config)
    config = tiny_config(shapes_data_dir, **{"eval.every": 5, "eval.num_samples": 4})
    with pytest.raises(ConfigError, match="eval.num_samples"):
        config_utils.validate(config)


def _autoencoder_evaluation(data_dir, reconstruct, split, num=40):
    """The periodic evaluation of the tiny autoencoder config listing adherence, with
    `reconstruct` (images in [-1, 1] -> images) standing in for the network."""
    from ldm_jax import config_utils, parallel
    from ldm_jax.evaluation.evaluator import ImageMaker, training_evaluator
    from test_autoencoder_stage import tiny_ae_config
    config = tiny_ae_config(data_dir, **{
        "eval.every": 5, "eval.metrics": ("adherence", "psnr"), "eval.num_samples": num,
        "eval.batch_size": 16, "eval.reference_split": split})
    config_utils.validate(config)
    maker = ImageMaker("reconstructions", lambda params, x: reconstruct(x))
    figures, _ = training_evaluator(config, parallel.make_mesh(), maker, lambda s: s)(None, 0)
    return figures


def test_a_perfect_autoencoder_scores_the_data_floor_on_every_attribute(shapes_data_dir):
    from ldm_jax.evaluation.shapes_adherence import ATTRIBUTES
    figures = _autoencoder_evaluation(shapes_data_dir, lambda x: x, "validation")
    # The held-out split is the shapes test split: every image holds a held-out pair.
    assert not [k for k in figures if "seen" in k] and figures["psnr"] == np.inf
    for a in ATTRIBUTES:
        floor = figures[f"adherence_data_held_out/{a}"]
        assert figures[f"adherence_held_out/{a}"] == floor >= 0.98, a


def test_an_autoencoder_that_swaps_colours_fails_colour_but_keeps_the_layout(shapes_data_dir):
    # R, G, B <- B, R, G: the objects change colour; gray, black and white backgrounds stay.
    # (Shape and size suffer too: the reader fits shapes to the colour it reads.)
    figures = _autoencoder_evaluation(shapes_data_dir, lambda x: x[..., [2, 0, 1]], "train")
    recon = {k.split("/")[1]: v for k, v in figures.items() if k.startswith("adherence_seen/")}
    floor = {k.split("/")[1]: v for k, v in figures.items()
             if k.startswith("adherence_data_seen/")}
    assert len(recon) == len(floor) == 7 and min(floor.values()) >= 0.98
    assert recon["color"] < floor["color"] - 0.5 and recon["all"] < floor["all"] - 0.5
    for a in ("background", "num_objects", "position"):
        assert recon[a] >= floor[a] - 0.05, (a, recon, floor)


def test_adherence_figures_split_seen_and_held_out_images(shapes_data_dir):
    """The one scoring function of samples and reconstructions, on a mix of both groups."""
    from ldm_jax.data import pipeline
    from ldm_jax.evaluation.evaluator import adherence_figures
    data = tiny_config(shapes_data_dir).data
    records = [pipeline.load_source(data, split)[i] for split in ("train", "test")
               for i in range(6)]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    figures = adherence_figures(images, records, ("color", "all"), name="adherence_data")
    assert figures == {f"adherence_data_{g}/{a}": 1.0 for g in ("seen", "held_out")
                       for a in ("color", "all")}
    wrong = adherence_figures(images[::-1], records, ("color",))  # seen images as held-out
    assert wrong["adherence_seen/color"] < 1 and wrong["adherence_held_out/color"] < 1


@pytest.fixture(scope="module")
def extractor():
    from ldm_jax import parallel
    from ldm_jax.evaluation.features import InceptionFeatures
    return InceptionFeatures(parallel.make_mesh(), batch_size=16)


def test_fid_and_kid_of_inception_features_equal_scipy(extractor, shapes_data_dir):
    from ldm_jax.data import pipeline
    from ldm_jax.evaluation.evaluator import inception_metrics
    config = tiny_config(shapes_data_dir)
    train = reference.split_images(pipeline.load_source(config.data, "train"), 40)
    test = reference.split_images(pipeline.load_source(config.data, "test"), 40)
    real, fake = extractor(train), extractor(test)
    assert real["pool"].shape == (40, 2048) and np.isfinite(real["pool"]).all()
    # Sharded batches of 16 with a padded last batch give the features of one image at a time.
    single = extractor(train[37:38])["pool"][0]
    np.testing.assert_allclose(real["pool"][37], single, rtol=1e-4, atol=1e-5)

    figures = inception_metrics(("fid", "kid"), real, fake)
    a, b = real["pool"].astype(np.float64), fake["pool"].astype(np.float64)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a) + np.trace(s_b)
              - 2 * np.trace(scipy.linalg.sqrtm(s_a @ s_b).real))
    assert figures["fid"] == pytest.approx(direct, rel=1e-5)
    assert figures["fid"] > 1.0  # held-out colour-shape pairs look different
    # Zero up to float64 round-off of a rank-40 covariance in 2048 dimensions.
    assert inception_metrics(("fid",), real, real)["fid"] == pytest.approx(0.0, abs=1e-3)

    d = a.shape[1]
    rng = np.random.default_rng(0)
    kids = []
    for _ in range(100):  # subsets of half of each set
        x, y = a[rng.choice(40, 20, replace=False)], b[rng.choice(40, 20, replace=False)]
        k = lambda u, v: (u @ v.T / d + 1) ** 3
        kxx, kyy = k(x, x), k(y, y)
        kids.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (20 * 19)
                    - 2 * k(x, y).mean())
    assert figures["kid"] == pytest.approx(np.mean(kids), rel=1e-6)
    assert figures["kid_std"] == pytest.approx(np.std(kids), rel=1e-5) and figures["kid_std"] > 0


def _run(module_or_script, *args):
    is_module = not module_or_script.endswith(".py")
    cmd = [sys.executable, *(["-m"] if is_module else []), module_or_script, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_training_evaluates_and_the_evaluate_command_reads_any_checkpoint(
        tmp_path, shapes_data_dir, extractor):
    """A tiny label-conditioned model: periodic evaluation during training writes metrics.jsonl
    and eval.jsonl; `python -m ldm_jax.evaluate` samples a checkpoint and appends its table;
    sample.py --out=DIR/ writes single PNGs that the folder comparison reads."""
    from ldm_jax.training.loop import train
    workdir = str(tmp_path / "wd")
    labels = ("num_objects", "background", "color_0", "shape_0", "size_0", "position_0",
              "color_1", "shape_1", "size_1", "position_1")
    overrides = {"training.num_steps": 2, "model.label_keys": labels,
                 "eval.every": 2, "eval.metrics": ("fid", "kid", "adherence"),
                 "eval.num_samples": 16, "eval.batch_size": 8}
    train(tiny_config(shapes_data_dir, **overrides), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/fid" in r]
    assert [r["step"] for r in evals] == [2]
    assert evals[0]["eval/fid"] > 0 and "eval/adherence_held_out/color" in evals[0]
    assert tensorboard_steps(os.path.join(workdir, "tensorboard"), "eval/fid") == [2]
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        assert json.loads(f.readline())["source"] == "training"

    out = _run("ldm_jax.evaluate", f"--workdir={workdir}", "--metrics=fid,pr,adherence",
               "--num=12", "--steps=3", "--guidance=2", "--batch_size=4")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("fid", "precision", "recall"):
        assert name in out.stdout, out.stdout
    lines = out.stdout.splitlines()  # adherence as one grid: a row per group
    header = next(l for l in lines if l.split()[:1] == ["background"])
    assert header.split() == ["background", "num_objects", "color", "shape", "size",
                              "position", "all"]
    for row in ("adherence_seen", "adherence_held_out"):
        cells = next(l for l in lines if l.startswith(row + " ")).split()[1:]
        assert len(cells) == 7 and all(0 <= float(c) <= 1 for c in cells), out.stdout
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        record = [json.loads(line) for line in f][-1]
    assert record["source"] == "evaluate" and record["step"] == 2
    assert record["sampling_steps"] == 3 and record["guidance"] == 2.0 and record["num"] == 12
    assert 0 <= record["adherence_seen/all"] <= 1 and record["fid"] > 0

    bad = _run("ldm_jax.evaluate", f"--workdir={workdir}", "--metrics=psnr")
    assert bad.returncode == 2 and "autoencoder workdirs only" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

    folder = str(tmp_path / "samples") + "/"
    out = _run("sample.py", f"--workdir={workdir}", "--num=10", "--steps=2", f"--out={folder}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(10)] + ["captions.txt"]
    assert os.path.exists(str(tmp_path / "samples_grid.png"))
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    from PIL import Image
    from ldm_jax.data import pipeline
    source = pipeline.load_source(tiny_config(shapes_data_dir).data, "train")
    for i in range(12):
        Image.fromarray(np.asarray(source[i]["image"])).save(reference_dir / f"{i}.png")
    out = _run("ldm_jax.evaluate", f"--images={folder}", f"--reference={reference_dir}",
               "--metrics=fid,kid")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fid" in out.stdout and "kid_std" in out.stdout


def test_inception_score_needs_the_classifier_head():
    from ldm_jax.evaluation import distribution_metrics as dm
    from ldm_jax.evaluation.evaluator import inception_metrics
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(30, 8))
    with_head = {"pool": pool, "logits_unbiased": rng.normal(size=(30, 5)) * 2}
    figures = inception_metrics(("is",), {"pool": pool}, with_head)
    assert (figures["is"], figures["is_std"]) == dm.inception_score(with_head["logits_unbiased"])
    with pytest.raises(ConfigError, match="classifier head"):
        inception_metrics(("is",), {"pool": pool}, {"pool": pool})


def test_adherence_grid_has_a_row_per_group():
    from ldm_jax.evaluate import format_adherence, split_adherence
    other, rows = split_adherence({"psnr": 30.0, "adherence_seen/color": 0.5,
                                   "adherence_seen/all": 0.25, "adherence_held_out/color": 1.0})
    assert other == {"psnr": 30.0}
    assert rows == {"adherence_seen": {"color": 0.5, "all": 0.25},
                    "adherence_held_out": {"color": 1.0}}
    lines = format_adherence(rows).splitlines()
    assert lines[0].split() == ["color", "all"]
    assert lines[1].split() == ["adherence_seen", "0.500", "0.250"]
    assert lines[2].split() == ["adherence_held_out", "1.000"]  # a missing cell stays blank
