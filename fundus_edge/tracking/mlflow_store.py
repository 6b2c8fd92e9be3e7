"""``--logger mlflow``: a run in a local MLflow store (SQLite file plus an artifacts folder;
no tracking server).

The store is ``LOGGER_DIR/mlflow.db`` with artifacts under ``LOGGER_DIR/artifacts/``. SQLite, not
the older ``./mlruns`` file store: MLflow 3 keeps the file store in maintenance mode and refuses
it unless ``MLFLOW_ALLOW_FILE_STORE`` is set, and SQLite is its default backend. Creating a new
store runs MLflow's table migrations once (about 10 s on a 2-core CPU); opening it later takes
about 4 s.

Through ``MlflowClient`` only (never the fluent ``mlflow.start_run`` API and its global active
run), so opening a tracker changes no process-wide state. What goes where in the run:

    log_config    artifact ``config.yaml`` and every leaf as a param (``optim.lr``, ...)
    log_params    params (git commit also as the tag ``mlflow.source.git.commit``)
    log_metrics   metrics with the epoch as their step
    log_images    ``log_image`` with a key per image and the epoch as step (the run page's
                  image slider)
    log_artifact  the file under the run's artifacts

Browse with ``mlflow ui --backend-store-uri sqlite:///LOGGER_DIR/mlflow.db`` (the ``mlflow``
distribution brings the UI; ``mlflow-skinny``, what the extra installs, logs and reads runs).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.tracking import Tracker, flatten, plain

__all__ = ["STORE_FILE", "MlflowTracker"]

#: The SQLite database in the logger folder.
STORE_FILE = "mlflow.db"

# MLflow's limits: a param value's length and entries per log_batch call.
_PARAM_CHARS = 6000
_BATCH = 100
# Characters MLflow accepts in metric, param and image keys.
_KEY_BAD = re.compile(r"[^\w\-. /]")


class MlflowTracker(Tracker):
    """One MLflow run. Build with :meth:`create` (a new run) or :meth:`reopen`.

    Args:
        client: an ``MlflowClient`` on the store.
        run_id: the run.
        tracking_uri: the store's URI (``sqlite:///...``), recorded to reopen the run.
    """

    kind = "mlflow"

    def __init__(self, client: Any, run_id: str, tracking_uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self._closed = False
        run = client.get_run(run_id)
        self.experiment_id = run.info.experiment_id
        # Params are immutable in MLflow: a resumed run logs only those it does not have.
        self._params = dict(run.data.params)

    @classmethod
    def create(cls, store: str | Path, run_name: str, experiment: str) -> MlflowTracker:
        """A new run named ``run_name`` in ``experiment`` (made when absent) of the store in
        folder ``store`` (made when absent).

        Raises:
            UserError: ``store`` cannot be made or is not an MLflow store.
        """
        store = Path(store).absolute()
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--logger-dir {store}: cannot be made ({exc})") from None
        uri = "sqlite:///" + str(store / STORE_FILE)
        client = _client(uri, store)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:  # artifacts beside the database, never in the current directory
            exp_id = client.create_experiment(
                experiment, artifact_location=(store / "artifacts").as_uri()
            )
        run = client.create_run(exp_id, run_name=run_name)
        return cls(client, run.info.run_id, uri)

    @classmethod
    def reopen(cls, tracking_uri: str, run_id: str) -> MlflowTracker:
        """The run ``run_id`` of the store at ``tracking_uri``, to log more into it.

        Raises:
            UserError: the store or the run is gone.
        """
        client = _client(tracking_uri, tracking_uri)
        try:
            client.get_run(run_id)
        except Exception as exc:  # MlflowException: RESOURCE_DOES_NOT_EXIST and kin
            raise UserError(
                f"MLflow run {run_id} is not in {tracking_uri} ({_first_line(exc)})"
            ) from None
        client.update_run(run_id, status="RUNNING")
        return cls(client, run_id, tracking_uri)

    # -- the interface -----------------------------------------------------------------------

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.client.log_dict(self.run_id, plain(config), "config.yaml")
        self.log_params(flatten(config))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        new, tags = [], []
        for k, v in params.items():
            key, value = _key(k), str(v)[:_PARAM_CHARS]
            if key in self._params:
                if self._params[key] != value:  # changed on resume: note it, keep the first
                    tags.append(RunTag(f"resumed.{key}", value))
                continue
            self._params[key] = value
            new.append(Param(key, value))
            if k == "git.commit":
                tags.append(RunTag("mlflow.source.git.commit", value))
        for i in range(0, len(new), _BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + _BATCH])
        if tags:
            self.client.log_batch(self.run_id, tags=tags[:_BATCH])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_key(k), float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for name, img in images.items():
            img = np.ascontiguousarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"image {name!r}: expected (H, W, 3) uint8, got {img.shape}")
            self.client.log_image(self.run_id, img, key=_key(f"maps/{name}"), step=int(step))

    def log_artifact(self, path: str | Path) -> None:
        src = Path(path)
        if not src.is_file():
            raise UserError(f"{src}: no such file to log as an artifact")
        self.client.log_artifact(self.run_id, str(src))

    def record(self) -> dict:
        return {
            "kind": self.kind,
            "tracking_uri": self.tracking_uri,
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
        }

    def close(self, ok: bool = True) -> None:
        if not self._closed:
            self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")
            self._closed = True


def _client(uri: str, where: str | Path) -> Any:
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as exc:  # an unusable store: one line naming it
        raise UserError(f"--logger-dir {where}: not an MLflow store ({_first_line(exc)})") from None


def _key(name: str) -> str:
    return _KEY_BAD.sub("_", str(name))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
