"""train.py then sample.py end to end, and one-line errors for bad input."""
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, tiny_cli_args


def run(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_train_then_sample_writes_png(tmp_path, shapes_data_dir):
    workdir = str(tmp_path / "wd")
    r = run(["train.py", "--config=configs/ddpm_shapes.py", f"--workdir={workdir}",
             *tiny_cli_args(shapes_data_dir, **{"training.num_steps": 2})])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2/2 | loss" in r.stdout + r.stderr
    out = str(tmp_path / "grid.png")
    r = run(["sample.py", f"--workdir={workdir}", "--num=6", "--steps=3", "--sampler=ddpm",
             "--seed=1", f"--out={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    with Image.open(out) as img:
        # 6 images -> 3 columns x 2 rows of 32px with 2px padding
        assert img.size == (2 + 3 * 34, 2 + 2 * 34) and img.mode == "RGB"
    r = run(["sample.py", f"--workdir={workdir}", "--num=2", "--caption=a large red circle "
             "in the center on a gray background"])
    _one_line_error(r, "unconditional", "--caption")


def test_conditional_train_then_sample_from_caption(tmp_path, shapes_data_dir):
    workdir = str(tmp_path / "wd")
    r = run(["train.py", "--config=configs/ddpm_shapes.py", f"--workdir={workdir}",
             *tiny_cli_args(shapes_data_dir, **{"training.num_steps": 2,
                                                "model.label_keys": ("background", "shape_0")})])
    assert r.returncode == 0, r.stderr[-3000:]
    caption = "a large red circle in the center on a gray background"
    out = str(tmp_path / "grid.png")
    r = run(["sample.py", f"--workdir={workdir}", "--num=4", "--steps=3", "--guidance=2.5",
             f"--caption={caption}", f"--out={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    with Image.open(out) as img:
        assert img.size == (2 + 2 * 34, 2 + 2 * 34)
    with open(str(tmp_path / "grid.txt")) as f:
        assert f.read().splitlines() == [f"{row}, {col}: {caption}" for row in (1, 2)
                                         for col in (1, 2)]
    # Without a caption: the labels of the test split's first records, captioned beside the grid.
    out = str(tmp_path / "test_split.png")
    r = run(["sample.py", f"--workdir={workdir}", "--num=3", "--steps=2", "--split=test",
             f"--out={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    from ldm_jax.data import shapes
    expected = [shapes.generate_example("test", i, 32)["caption"] for i in range(3)]
    with open(str(tmp_path / "test_split.txt")) as f:
        assert [line.split(": ", 1)[1] for line in f.read().splitlines()] == expected
    r = run(["sample.py", f"--workdir={workdir}", "--caption=a huge red circle"])
    _one_line_error(r, "not a shapes caption")
    # --class names the labels, by value name or number
    out = str(tmp_path / "classes.png")
    r = run(["sample.py", f"--workdir={workdir}", "--steps=2", f"--out={out}",
             "--class=background=gray,shape_0=circle", "--class=background=3,shape_0=cross"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(str(tmp_path / "classes.txt")) as f:
        assert f.read().splitlines() == ["1, 1: background=gray, shape_0=circle",
                                         "1, 2: background=beige, shape_0=cross"]
    r = run(["sample.py", f"--workdir={workdir}", "--class=circle"])
    _one_line_error(r, "this model has 2 labels")


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["--config.training.lerning_rate=1"], ["unknown config key", "training.lerning_rate"]),
    (["--config.trainig.num_steps=1"], ["unknown config key", "trainig.num_steps"]),
    (["--config.training.num_steps=ten"], ["training.num_steps", "ten"]),
    (["--config.data.image_size=48"], ["data.image_size", "48"]),
    (["--config.model.channel_mult=(1,2,2,2,2,2,2)"], ["image size 32", "not divisible by 64"]),
    (["--config.model.attention_resolutions=(4,)"], ["attention_resolutions", "[4]"]),
    (["--config.training.batch_size=12"], ["batch_size=12", "8 devices"]),
    (["--config.diffusion.timestep_sampling=lognormal"],
     ["diffusion.timestep_sampling", "lognormal", "logit_normal"]),
    (["--config.diffusion.logit_std=0.0"], ["diffusion.logit_std", "positive"]),
    (["--config.model.label_keys=('colour_0',)"], ["model.label_keys", "colour_0", "color_0"]),
    (["--config.sampling.guidance_scale=3.0"], ["guidance_scale", "model.label_keys"]),
])
def test_bad_train_input_is_one_line(tmp_path, args, needles):
    r = run(["train.py", "--config=configs/ddpm_shapes.py", f"--workdir={tmp_path}", *args])
    _one_line_error(r, *needles)


def test_missing_workdir_for_sampling(tmp_path):
    r = run(["sample.py", f"--workdir={tmp_path / 'nope'}"])
    _one_line_error(r, "does not exist")


def test_workdir_without_checkpoint(tmp_path):
    from configs import ddpm_shapes
    from ldm_jax.config_utils import save_config
    save_config(ddpm_shapes.get_config(), str(tmp_path))
    r = run(["sample.py", f"--workdir={tmp_path}"])
    _one_line_error(r, "no complete checkpoint")


def test_missing_config_flag(tmp_path):
    r = run(["train.py", f"--workdir={tmp_path}"])
    _one_line_error(r, "--config")
