"""The cluster launch paths in launch/, with real processes on one machine: 2-node torchrun and DeepSpeed
launches over loopback through their scripts, the SLURM script under a stand-in scheduler, the data pipeline
submitted as a job to a 2-node Ray cluster on loopback (beit3.launch.ray.local_cluster), and the Ray cluster YAML
checked against Ray's own schema."""

import copy
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.sources import plan_shards
from beit3.launch.ray.local_cluster import loopback_cluster
from beit3.pretrain.checkpoints import tag_for
from beit3.sample_data import tiny_recipe
from pipeline_inputs import BAD_IMAGES, data_config, make_imagenet, make_spm, make_text
from s3_endpoint import CREDENTIALS, free_port
from training_fixtures import REPO, write_recipe

pytestmark = pytest.mark.slow  # end to end: 2-node launches and a Ray cluster on loopback

LAUNCH = REPO / "launch"
SHELL_SCRIPTS = [LAUNCH / "torchrun" / "train.sh", LAUNCH / "deepspeed" / "train.sh", LAUNCH / "slurm" / "train.sbatch"]
BIN = Path(sys.executable).parent
STEPS = 3


def launch_environment(**extra: str) -> dict:
    """CPU ranks, no Ray address from the caller's shell, and this environment's commands (torchrun, deepspeed)
    on PATH. They go last so that every other tool resolves as for the rest of the suite: a different `ninja`
    would rebuild DeepSpeed's just-in-time ops in their shared cache (its log format differs between versions)."""
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment.update(PATH=f"{environment.get('PATH', '')}{os.pathsep}{BIN}", DS_ACCELERATOR="cpu",
                       OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    environment.update(extra)
    return environment


def dry_run(script: Path, *arguments: str, **environment: str) -> list[str]:
    """The launcher command a script would run (its DRY_RUN mode), as an argument list."""
    result = subprocess.run(["bash", str(script), *arguments], env=launch_environment(DRY_RUN="1", **environment),
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def run_nodes(script: Path, node_environments: list[dict], logs: Path, timeout: float = 300) -> None:
    """Start the script once per node, all at once, and require every node to finish cleanly. Each node is a
    process group of its own, so that a node that hangs is stopped with its launcher's rank processes."""
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for node, environment in enumerate(node_environments):
        with open(logs / f"node-{node}.log", "w") as log:
            processes.append(subprocess.Popen(["bash", str(script)], env=launch_environment(**environment),
                                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    for node, process in enumerate(processes):
        output = (logs / f"node-{node}.log").read_text()
        assert process.returncode == 0, f"node {node} exited with {process.returncode}:\n{output[-6000:]}"


def assert_trained(run_dir: Path, ranks: int = 2) -> None:
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in history if "loss" in entry] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(STEPS)
    assert (run_dir / "checkpoints" / tag_for(STEPS)).is_dir()
    assert sorted(path.name for path in (run_dir / "samples").iterdir()) == [f"rank-{r}.jsonl" for r in range(ranks)]


@pytest.fixture
def short_recipe(tmp_path, training_data) -> Path:
    recipe = tiny_recipe(tmp_path / "run", training_data, steps=STEPS, log_every_steps=1,
                         checkpoint={"every_steps": STEPS, "keep_last": 1}, mlflow={"log_system_metrics": False})
    return write_recipe(tmp_path / "recipe.yaml", recipe)


def test_shell_scripts_parse():
    for script in SHELL_SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


def test_torchrun_script_trains_on_two_nodes_over_loopback(short_recipe):
    """Two torchrun launchers, one rank each, meet at a c10d rendezvous on 127.0.0.1 and train together."""
    node = {"CONFIG": str(short_recipe), "NNODES": "2", "NPROC_PER_NODE": "1",
            "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RDZV_ID": "test-torchrun"}
    run_nodes(LAUNCH / "torchrun" / "train.sh", [node, node], short_recipe.parent / "logs")
    assert_trained(short_recipe.parent / "run")


def test_deepspeed_script_trains_on_two_hostfile_nodes_without_ssh(short_recipe):
    """Each node of a two-line hostfile started on its own (NODE_RANK: deepspeed --no_ssh), as a scheduler's
    per-node task would; over ssh (pdsh) the runner starts the same per-node launcher on every host."""
    hostfile = short_recipe.parent / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    common = {"CONFIG": str(short_recipe), "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    run_nodes(LAUNCH / "deepspeed" / "train.sh", [{**common, "NODE_RANK": "0"}, {**common, "NODE_RANK": "1"}],
              short_recipe.parent / "logs")
    assert_trained(short_recipe.parent / "run")


def test_torchrun_script_modes():
    script = LAUNCH / "torchrun" / "train.sh"
    static = dry_run(script, "--resume", CONFIG="recipe.yaml", NNODES="4", NPROC_PER_NODE="8", NODE_RANK="3",
                     RDZV_ENDPOINT="node-0:29400")
    assert static[0] == "torchrun" and option(static, "--node_rank") == "3"
    assert (option(static, "--master_addr"), option(static, "--master_port")) == ("node-0", "29400")
    assert static[static.index("-m"):] == ["-m", "beit3.cli", "train", "--config", "recipe.yaml", "--resume"]
    single = dry_run(script, CONFIG="recipe.yaml")
    assert "--standalone" in single and option(single, "--nproc_per_node") == "gpu"
    missing = subprocess.run(["bash", str(script)], env=launch_environment(CONFIG="recipe.yaml", NNODES="2"),
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "RDZV_ENDPOINT" in missing.stderr


def test_deepspeed_script_launches_over_ssh_from_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    shutil.copy(LAUNCH / "deepspeed" / "hostfile.example", hostfile)
    command = dry_run(LAUNCH / "deepspeed" / "train.sh", CONFIG="recipe.yaml", HOSTFILE=str(hostfile))
    assert command[0] == "deepspeed" and option(command, "--hostfile") == str(hostfile)
    assert "--no_ssh" not in command and "--no_local_rank" in command
    assert command[command.index("--module"):] == ["--module", "beit3.cli", "train", "--config", "recipe.yaml"]


def test_deepspeed_script_keeps_secrets_out_of_the_nodes_environment_and_the_log(tmp_path):
    """Under a stand-in `deepspeed` that prints the env file it is handed and a log line like its runner's ssh
    command (which carries every forwarded value): the AWS endpoint travels, the AWS keys do not, and the
    MLflow token the runner forwards by itself is masked in the log."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "deepspeed").write_text(
        '#!/usr/bin/env bash\ncat "$DS_ENV_FILE"\n'
        'echo "cmd = pdsh -w node-0 export MLFLOW_TRACKING_TOKEN=$MLFLOW_TRACKING_TOKEN; cd /x; python -u"\n'
        'echo "export NCCL_DEBUG=INFO; export MLFLOW_TRACKING_PASSWORD=$MLFLOW_TRACKING_PASSWORD;" >&2\n')
    (fake_bin / "deepspeed").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    shutil.copy(LAUNCH / "deepspeed" / "hostfile.example", hostfile)
    secrets_set = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEY7QM2PLX4Z", "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-Jr5Wq8Zt",
                   "AWS_SESSION_TOKEN": "fake-aws-session-Hn3Vb6Ks", "MLFLOW_TRACKING_TOKEN": "fake-token-Cx9Dm1Lp",
                   "MLFLOW_TRACKING_PASSWORD": "fake-password-Pq4Rt7Ya"}
    environment = launch_environment(CONFIG="recipe.yaml", HOSTFILE=str(hostfile), AWS_ENDPOINT_URL="http://s3.local",
                                     **secrets_set)
    environment["PATH"] = f"{fake_bin}{os.pathsep}{environment['PATH']}"
    result = subprocess.run(["bash", str(LAUNCH / "deepspeed" / "train.sh")], env=environment, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "AWS_ENDPOINT_URL=http://s3.local" in result.stdout
    assert "export MLFLOW_TRACKING_TOKEN=***;" in result.stdout
    assert "export NCCL_DEBUG=INFO; export MLFLOW_TRACKING_PASSWORD=***;" in result.stderr
    assert [secret for secret in secrets_set.values() if secret in result.stdout + result.stderr] == []


def test_sbatch_script_starts_torchrun_on_the_allocation(tmp_path):
    """The batch script under stand-ins for SLURM's scontrol and srun (one node, so srun runs the step once)."""
    scheduler = tmp_path / "slurm-bin"
    scheduler.mkdir()
    (scheduler / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\necho 127.0.0.2\n")
    (scheduler / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    for tool in scheduler.iterdir():
        tool.chmod(0o755)
    slurm = {"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu-[001-002]",
             "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64",
             "PATH": f"{scheduler}{os.pathsep}{os.environ['PATH']}"}
    command = dry_run(LAUNCH / "slurm" / "train.sbatch", "configs/pretrain/giant_paper.yaml", **slurm)
    assert command[0] == "torchrun"
    assert option(command, "--nnodes") == "1" and option(command, "--nproc_per_node") == "8"
    assert option(command, "--rdzv_backend") == "c10d" and option(command, "--rdzv_endpoint") == "127.0.0.1:29500"
    assert option(command, "--rdzv_id") == "4242"
    assert command[command.index("-m"):] == ["-m", "beit3.cli", "train", "--config",
                                             "configs/pretrain/giant_paper.yaml"]
    directives = [line.split()[1] for line in (LAUNCH / "slurm" / "train.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert {"--ntasks-per-node=1", "--requeue", "--export=ALL"} <= set(directives)
    assert any(directive.startswith("--gpus-per-node=") for directive in directives)


def test_ray_cluster_yaml_is_valid_for_the_autoscaler():
    from ray.autoscaler._private.util import prepare_config, validate_config as validate_cluster

    config = yaml.safe_load((LAUNCH / "ray" / "cluster.yaml").read_text())
    validate_cluster(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0 and types["gpu_worker"]["resources"]["GPU"] >= 1
    assert any("pip install" in command and "beit3-pretrain" in command for command in config["setup_commands"])


def test_launch_packages_are_installed():
    """Every folder of Python files under launch/ is a package that setup.py lists (so the wheel carries it)."""
    from distutils.core import run_setup  # setuptools' copy

    listed = set(run_setup(str(REPO / "setup.py"), stop_after="init").packages)
    folders = {path.parent for path in LAUNCH.rglob("*.py") if "__pycache__" not in path.parts}
    for folder in folders:
        assert (folder / "__init__.py").is_file(), folder
        assert ".".join(["beit3", *folder.relative_to(REPO).parts]) in listed, folder


@pytest.fixture(scope="module")
def s3_bucket_name(s3_endpoint_url) -> str:
    name = f"launch-{secrets.token_hex(6)}"
    boto3.client("s3", endpoint_url=s3_endpoint_url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                 aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
    return name


def test_ray_jobs_get_aws_keys_only_when_asked(monkeypatch):
    """Ray shows a job's environment to anyone who can list jobs: keys go there only with the flag."""
    from beit3.launch.ray.submit import aws_environment

    secret = "fake-secret-key-in-the-submitting-shell"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert secret not in aws_environment().values()
    assert aws_environment()["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert aws_environment(with_credentials=True)["AWS_SECRET_ACCESS_KEY"] == secret


def test_data_pipeline_runs_as_a_job_on_a_two_node_ray_cluster(tmp_path, s3_endpoint_url, s3_bucket_name):
    """Submitted with beit3.launch.ray.submit --wait --forward-aws-credentials; the shards go to S3 with the
    credentials and endpoint of the submitting shell only, so they reach the cluster through the job's runtime
    environment."""
    good_images = make_imagenet(tmp_path / "imagenet", per_class=2)
    make_text(tmp_path / "text")
    output = f"s3://{s3_bucket_name}/shards"
    raw = data_config(output, str(tmp_path / "imagenet"), str(tmp_path / "text"), str(make_spm(tmp_path)))
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump(raw))
    aws = {"AWS_ENDPOINT_URL": s3_endpoint_url, **CREDENTIALS}

    # The job's entrypoint runs `python` from the nodes' PATH: this environment's Python goes first.
    nodes = launch_environment(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token",
                               RAY_AUTH_TOKEN=secrets.token_hex(32))
    with loopback_cluster(2, tmp_path, dashboard=True, environment=nodes) as cluster:
        result = subprocess.run([sys.executable, "-m", "beit3.launch.ray.submit", "--address", cluster.dashboard,
                                 "--config", str(config), "--wait", "--quiet", "--forward-aws-credentials"],
                                env={**cluster.environment, **aws}, cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
    assert cluster.leftovers == [], f"Ray processes outlived the cluster: {cluster.leftovers}"
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "submitted job raysubmit_" in result.stdout and "SUCCEEDED" in result.stdout

    s3 = boto3.client("s3", endpoint_url=s3_endpoint_url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                      aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    manifest = json.loads(s3.get_object(Bucket=s3_bucket_name, Key="shards/manifest.json")["Body"].read())
    planned = {plan.name for plan in plan_shards(validate_config(DataConfig, raw, str(config)))}
    assert {entry["shard"] for entry in manifest["shards"]} == planned
    stored = {item["Key"] for item in s3.list_objects_v2(Bucket=s3_bucket_name, Prefix="shards/")["Contents"]}
    assert {f"shards/{entry['name']}" for entry in manifest["shards"] if entry["samples"]} <= stored
    images = manifest["sources"]["in21k"]
    assert images["written"] == len(good_images)
    assert sum(images["skipped"].values()) == len(BAD_IMAGES)
    assert manifest["sources"]["corpus"]["written"] > 0
