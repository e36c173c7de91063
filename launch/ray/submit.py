"""Submit `beit3 data build` to a running Ray cluster as a job, through the cluster's dashboard address.

    python -m beit3.launch.ray.submit --address http://HEAD:8265 --config configs/data/paper.yaml [--wait]

The config file travels with the job (the runtime environment's working directory, which is also the job's
current directory), so the paths inside it must be reachable from every node: `s3://` or absolute paths on a
shared filesystem. The AWS_* settings of this shell (endpoint, region, profile) are handed to the job, so they
reach the cluster's processes; the keys themselves only with `--forward-aws-credentials`, since Ray shows a
job's environment to anyone who can list jobs (credentials on the nodes, such as an instance role, are better).
"""

import argparse
import asyncio
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient


def build_entrypoint(config_name: str, quiet: bool) -> str:
    """The job's command; `--ray-address auto` joins the cluster the job runs on instead of starting one."""
    command = ["python", "-m", "beit3.cli", "data", "build", "--config", config_name, "--ray-address", "auto"]
    return shlex.join(command + (["--quiet"] if quiet else []))


AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
"""Ray keeps a job's environment in its job table, which `ray job list` and the dashboard show to anyone who
can reach the cluster: these go there only when asked for."""


def aws_environment(with_credentials: bool = False) -> dict[str, str]:
    """The submitting shell's AWS_* settings (endpoint, region, profile, retries), keys only when asked for."""
    return {name: value for name, value in os.environ.items()
            if name.startswith("AWS_") and (with_credentials or name not in AWS_SECRETS)}


def submit(client: JobSubmissionClient, config: Path, quiet: bool = False, with_credentials: bool = False) -> str:
    """Upload the config with the job and start it; returns the job's submission id."""
    with tempfile.TemporaryDirectory() as staging:
        shutil.copy(config, Path(staging) / config.name)
        return client.submit_job(
            entrypoint=build_entrypoint(config.name, quiet),
            runtime_env={"working_dir": staging, "env_vars": aws_environment(with_credentials)},
            metadata={"config": str(config)},
        )


async def _print_logs(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def follow(client: JobSubmissionClient, job_id: str) -> JobStatus:
    """Print the job's logs until it ends; returns its final status."""
    asyncio.run(_print_logs(client, job_id))
    return client.get_job_status(job_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beit3.launch.ray.submit", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    parser.add_argument("--config", required=True, type=Path, help="a data YAML, e.g. configs/data/paper.yaml")
    parser.add_argument("--wait", action="store_true", help="follow the logs; exit non-zero unless the job succeeds")
    parser.add_argument("--quiet", action="store_true", help="no progress bars in the job's logs")
    parser.add_argument("--forward-aws-credentials", action="store_true",
                        help="also hand this shell's AWS keys to the job (Ray shows a job's environment to anyone "
                             "who can list jobs; prefer credentials on the nodes, e.g. an instance role)")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        print(f"submit: {args.config}: config file not found", file=sys.stderr)
        return 2
    try:
        client = JobSubmissionClient(args.address)
        job_id = submit(client, args.config, quiet=args.quiet, with_credentials=args.forward_aws_credentials)
    except (ConnectionError, RuntimeError) as error:  # unreachable cluster, refused or unauthenticated request
        print(f"submit: {error}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id} to {args.address}", flush=True)
    if not args.wait:
        return 0
    status = follow(client, job_id)
    print(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
