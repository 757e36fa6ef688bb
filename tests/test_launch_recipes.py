"""The launch recipes in scripts/launch/ are valid shell/YAML, run the one train.py command, and
rely only on flags, config keys and environment variables that the code really reads."""
import os
import re
import subprocess

import jax
import pytest
import yaml

from conftest import ROOT

LAUNCH = os.path.join(ROOT, "scripts", "launch")
SHELL_RECIPES = ("slurm.sbatch", "tpu_pod.sh")
RECIPES = SHELL_RECIPES + ("jobset.yaml",)
# train.py's own flags as the recipes write them: --config=, --config.a.b=, --workdir=, and the
# snake_case ones (srun/gcloud options are hyphenated or single words like --zone=).
TRAIN_FLAG = re.compile(r"--(config(?:\.[\w.]+)?|workdir|[a-z]+(?:_[a-z]+)+)=")


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _jobset():
    return yaml.safe_load(_read("scripts", "launch", "jobset.yaml"))


def _container(jobset):
    rjob = jobset["spec"]["replicatedJobs"][0]
    return rjob, rjob["template"]["spec"]["template"]["spec"]["containers"][0]


def _bash_syntax_ok(path):
    result = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    return result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SHELL_RECIPES)
def test_shell_recipes_parse(name):
    ok, err = _bash_syntax_ok(os.path.join(LAUNCH, name))
    assert ok, err


def test_jobset_is_an_indexed_jobset_whose_command_parses(tmp_path):
    jobset = _jobset()
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    rjob, container = _container(jobset)
    job = rjob["template"]["spec"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert job["completionMode"] == "Indexed" and rjob["replicas"] == 1
    assert job["parallelism"] == job["completions"] == int(env["NUM_PROCESSES"])
    # Pod 0 of job 0 is <jobset>-<replicatedJob>-0-0 in the subdomain <jobset> (the default).
    name = jobset["metadata"]["name"]
    subdomain = jobset["spec"].get("network", {}).get("subdomain", name)
    host, port = env["COORDINATOR"].rsplit(":", 1)
    assert host == f"{name}-{rjob['name']}-0-0.{subdomain}"
    assert int(port) in [p["containerPort"] for p in container["ports"]]
    script = container["command"][-1]
    assert "--process_id=\"$JOB_COMPLETION_INDEX\"" in script
    path = tmp_path / "command.sh"
    path.write_text(script)
    ok, err = _bash_syntax_ok(str(path))
    assert ok, err
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(env["WORKDIR"].startswith(m + "/") for m in mounts), "workdir not on a volume"


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_runs_the_one_train_command(name):
    text = _read("scripts", "launch", name)
    commands = [text[m.end():m.end() + 200]
                for m in re.finditer(r"train\.py[\s\\]+(?=--)", text)]
    assert commands, f"{name} runs no train.py"
    for command in commands:
        assert command.startswith("--config=") and "--workdir=" in command, (name, command)


def test_flags_config_keys_and_env_names_exist_in_the_code():
    from configs import ddpm_shapes
    defined = _read("train.py") + _read("ldm_jax", "cli.py")
    config = ddpm_shapes.get_config()
    used = set()
    for name in RECIPES:
        used |= set(TRAIN_FLAG.findall(_read("scripts", "launch", name)))
    assert {"config", "workdir", "coordinator_address", "num_processes", "process_id"} <= used
    for flag in sorted(used):
        if flag.startswith("config."):  # every --config.a.b override names a real field
            node = config
            for part in flag.split(".")[1:]:
                assert part in node, f"--{flag}: no such config field"
                node = node[part]
        else:
            assert re.search(rf"DEFINE_\w+\(\s*\"{flag}\"", defined), f"--{flag} is not defined"

    texts = {name: _read("scripts", "launch", name) for name in RECIPES}
    assert "LDM_JAX_DISTRIBUTED=1" in texts["slurm.sbatch"] + texts["tpu_pod.sh"]
    assert '"LDM_JAX_DISTRIBUTED"' in _read("ldm_jax", "parallel.py")
    assert all("LDM_JAX_CACHE_DIR" in t for t in texts.values())
    assert '"LDM_JAX_CACHE_DIR"' in _read("ldm_jax", "cli.py")
    assert "--worker=all" in texts["tpu_pod.sh"]
    # JAX's own names the SLURM recipe leans on: it reads JAX_LOCAL_DEVICE_IDS, and its SLURM
    # detection takes the process id from SLURM_PROCID.
    jax_src = os.path.join(os.path.dirname(jax.__file__), "_src")
    with open(os.path.join(jax_src, "distributed.py")) as f:
        assert "'JAX_LOCAL_DEVICE_IDS'" in f.read()
    with open(os.path.join(jax_src, "clusters", "slurm_cluster.py")) as f:
        assert "'SLURM_PROCID'" in f.read()
    assert "JAX_LOCAL_DEVICE_IDS" in texts["slurm.sbatch"]
