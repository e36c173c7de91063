"""Where rank 0's metrics go: MLflow (a local SQLite store by default, or any tracking server).

The trainer talks to this small interface only, so tests read back a real MLflow store and nothing else in the
trainer knows about MLflow.
"""

import os
from pathlib import Path
from typing import Protocol

import mlflow
from mlflow.tracking import MlflowClient

from beit3.redaction import redact_urls, split_url_credentials

RUN_ID_FILE = "mlflow_run_id"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
"""How MLflow's UI classifies the experiment: model training, not GenAI tracing or evaluation."""


class MetricsSink(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class DiscardingSink:
    """Ranks other than 0 log nothing."""

    run_id = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def tracking_uri(configured: str | None, run_dir: Path) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else SQLite in the run directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class MlflowSink:
    """One MLflow run per training run; a resumed job reopens the run id kept in the run directory."""

    def __init__(self, run_dir: Path, uri: str, experiment: str, run_name: str, params: dict[str, str],
                 tags: dict[str, str], system_metrics_interval: float | None):
        uri, user, password = split_url_credentials(uri)
        if user is not None:  # MLflow writes its tracking URI into error messages: credentials go beside it
            os.environ["MLFLOW_TRACKING_USERNAME"] = user
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password or ""
        mlflow.set_tracking_uri(uri)
        if system_metrics_interval:
            mlflow.set_system_metrics_sampling_interval(system_metrics_interval)
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            local_store = uri.startswith("sqlite:") or uri.startswith("file:")
            location = (run_dir / "mlflow-artifacts").resolve().as_uri() if local_store else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
        self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        id_file = run_dir / RUN_ID_FILE
        resumed = id_file.exists()
        run = mlflow.start_run(run_id=id_file.read_text().strip() if resumed else None, experiment_id=experiment_id,
                               run_name=None if resumed else run_name, log_system_metrics=bool(system_metrics_interval))
        self.run_id = run.info.run_id
        if not resumed:
            id_file.write_text(self.run_id)
            mlflow.log_params(params)
        mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        mlflow.log_artifact(str(path))

    def close(self, status: str = "FINISHED") -> None:
        mlflow.end_run(status=status)


def flatten(prefix: str, value: object) -> dict[str, str]:
    """A nested config as MLflow params: `optimizer.peak_lr` -> '0.001' (credentials in URLs redacted)."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return flat
    return {prefix: redact_urls(str(value))}
