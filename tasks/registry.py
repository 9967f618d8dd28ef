"""The MLflow model registry: register a trained model, promote it, roll back, fetch it.

A registered version holds one MLflow pyfunc model logged from code, nothing pickled (the caller
names it: :func:`tasks.serving.mlflow_model.pyfunc_model`, image bytes in, cut-out bytes out, so
``mlflow models serve`` runs it), and as its artifacts the three files production reads without
MLflow's loader: ``model.pt`` (the state dict), ``config.json`` (model name, widths, input size,
resize mode) and ``model.onnx`` (see :mod:`tasks.model.export`). :func:`download_model` puts those
three in one folder, which :func:`tasks.model.io.load_model` and :mod:`tasks.serving.engines` read.

Promotion uses registered-model **aliases**, never the deprecated stages: ``champion`` is the
model in production and ``previous`` the one it replaced. Every promotion and rollback writes one
new registered-model tag ``champion_history.<time>.<random>`` (an append-only log: no writer reads,
changes and rewrites a shared value, so none can lose another's update); replaying the log gives
the stack of champions, so :func:`rollback` can step back more than once. :func:`promote` is a
compare-and-set: given the champion the challenger was compared with, it refuses when the alias
has moved since (:class:`ChampionMoved`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from typing import Any

from tasks.core import layout, storage
from tasks.core.errors import first_line
from tasks.model.config import PRETRAINED

__all__ = [
    "AUTO",
    "CHAMPION",
    "ChampionMoved",
    "DEFAULT_MODEL_NAME",
    "PREVIOUS",
    "absolute_tracking_uri",
    "alias_version",
    "best_champion",
    "download_model",
    "is_model_uri",
    "list_versions",
    "missing_store",
    "model_uri",
    "pinned_uri",
    "rolled_back_versions",
    "choose_start",
    "default_artifact_location",
    "promote",
    "promotion_concerns",
    "register_model",
    "rollback",
    "stage_weights",
    "start_weights",
    "training_recipe",
    "version_tags",
]

DEFAULT_MODEL_NAME = "bgremoval-u2net"
CHAMPION = "champion"
PREVIOUS = "previous"
_HISTORY_TAG = "champion_history"
_EXTRA_FILES = (layout.MODEL_WEIGHTS, layout.MODEL_CONFIG, "model.onnx")
_OPTIONAL_FILES = layout.MODEL_SIDECARS  # written by the calibration, when the model was calibrated
_FILE_FOLDERS = ("artifacts", "extra_files")  # the pyfunc's artifacts; versions logged before it used extra files


def _client(tracking_uri: str | None = None):
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.MlflowClient()


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go when nobody said: ``$BGREMOVAL_MLFLOW_ARTIFACTS``, else,
    for a SQLite store, a folder beside the database named after it (``runs.db`` ->
    ``runs-artifacts``; a store in a shared folder such as /tmp gets a folder of its own), else None
    (the tracking server's default root). MLflow's own default for a SQLite store is ``./mlruns``
    under whatever folder the process runs in, which scatters one store's artifacts over every
    working directory that ever created an experiment in it."""
    if os.environ.get("BGREMOVAL_MLFLOW_ARTIFACTS"):
        return os.environ["BGREMOVAL_MLFLOW_ARTIFACTS"]
    if tracking_uri.startswith("sqlite:///"):
        return os.path.splitext(os.path.abspath(tracking_uri[len("sqlite:///"):]))[0] + "-artifacts"
    return None


def absolute_tracking_uri(uri: str) -> str:
    """``uri`` with a relative local store made absolute against the current folder: ``sqlite:///x.db``
    -> ``sqlite:////<cwd>/x.db``, a bare path or ``file:x`` -> ``file:///<cwd>/x``. Other URIs
    (servers, ``databricks``) are returned as given. The training workers run in the project's
    folder, where a relative store would name another database, or none."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and not path.startswith(":memory:"):
            return "sqlite:///" + os.path.abspath(path)
        return uri
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        return uri if path.startswith("/") else "file://" + os.path.abspath(path)
    if uri and "://" not in uri and not os.path.isabs(uri) and uri not in ("databricks", "databricks-uc"):
        return "file://" + os.path.abspath(uri)
    return uri


def missing_store(uri: str) -> str | None:
    """The database file of a local SQLite store (``sqlite:///path``) that does not exist, else None.
    Reading a registry there would make MLflow create an empty database; a relative store named from
    another folder is the usual cause."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return path if path and not path.startswith(":memory:") and not os.path.exists(path) else None


def model_uri(name: str = DEFAULT_MODEL_NAME, alias: str | None = CHAMPION, version: str | int | None = None) -> str:
    """Return ``models:/<name>@<alias>`` or, with ``version``, ``models:/<name>/<version>``."""
    return f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"


def pinned_uri(uri: str, tracking_uri: str | None = None) -> str:
    """``models:/<name>/<version>`` of the version an alias URI (``models:/<name>@<alias>``) points at
    now, so what is loaded and what is recorded are the same version even if the alias moves
    meanwhile; any other URI as it is (``models:/team@shop/3`` is version 3 of ``team@shop``, as
    MLflow reads it). Raises ``FileNotFoundError`` for an alias that does not exist; other registry
    errors (unreachable, refused) as MLflow raises them."""
    from mlflow.exceptions import MlflowException

    name, at, alias = uri.removeprefix("models:/").rpartition("@")
    if not uri.startswith("models:/") or not at or "/" in alias:
        return uri
    try:
        version = _client(tracking_uri).get_model_version_by_alias(name, alias).version
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(exc):
            raise
        import mlflow

        raise FileNotFoundError(f"{uri} is not in the registry at {tracking_uri or mlflow.get_tracking_uri()}: "
                                f"no registered model {name!r} with the alias {alias!r}") from None
    return model_uri(name, version=str(version))


def alias_version(name: str = DEFAULT_MODEL_NAME, alias: str = CHAMPION, tracking_uri: str | None = None) -> str | None:
    """Return the version number (as a string) that ``alias`` points at, or None when the
    registered model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def copy_sidecars(model_url: str, folder: str, storage_options: dict | None = None) -> list[str]:
    """Copy the :data:`tasks.core.layout.MODEL_SIDECARS` found beside a model (a run folder, or a
    ``.pt``/``.onnx`` file in it; local or remote) into the local ``folder``; returns the paths written."""
    written = []
    for name in _OPTIONAL_FILES:
        url = storage.join(layout.model_folder(model_url), name)
        if storage.exists(url, storage_options):
            path = os.path.join(folder, name)
            with open(path, "wb") as fh:
                fh.write(storage.read_bytes(url, storage_options))
            written.append(path)
    return written


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tag_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def register_model(model_url: str, name: str = DEFAULT_MODEL_NAME, run_id: str | None = None,
                   tags: dict[str, Any] | None = None, storage_options: dict | None = None,
                   tracking_uri: str | None = None, experiment: str = "bgremoval",
                   description: str | None = None, *, pyfunc_model: dict[str, Any]) -> dict[str, Any]:
    """Register a trained model as a new version of ``name``.

    Args:
        model_url: a training output folder (or its ``model.pt``), local or ``s3://``, as written
            by :func:`tasks.train.loop.train`.
        name: the registered model's name (created when missing).
        pyfunc_model: the keyword arguments of ``mlflow.pyfunc.log_model`` for the model itself
            (:func:`tasks.serving.mlflow_model.pyfunc_model`); the model's files are added as its
            ``artifacts``, keyed by file name.
        run_id: the MLflow run to log the model into (the training run); None starts a new run
            in ``experiment``.
        tags: set on the model version (numbers are written with 6 decimals, others as JSON),
            e.g. the test metrics and the dataset version.
        storage_options: fsspec options for ``model_url``.
        tracking_uri: MLflow tracking URI (None: ``MLFLOW_TRACKING_URI``).
        description: the version's description.

    Returns ``{"name", "version", "model_uri", "run_id", "onnx_sha256", "input_size",
    "registered_before"}``. The ONNX export is checked against PyTorch before anything is logged.
    Registering the same run folder's same weights again (a retried or cleared task) registers
    nothing: the tags the earlier version lacks are added (none it has is replaced) and it is
    returned (``registered_before``).
    """
    import mlflow
    import torch

    from tasks.model.io import load_model
    from tasks.model.export import export_onnx

    client = _client(tracking_uri)
    model, meta = load_model(model_url, storage_options=storage_options)
    size = int(meta["input_size"])
    config = {"model": meta["model"], "model_widths": meta["model_widths"], "input_size": size,
              "resize": meta["resize"]}
    with tempfile.TemporaryDirectory(prefix="bgremoval-register-") as tmp:
        torch.save(model.state_dict(), os.path.join(tmp, layout.MODEL_WEIGHTS))
        with open(os.path.join(tmp, layout.MODEL_CONFIG), "w") as fh:
            json.dump(config, fh, indent=2)
        onnx_info = export_onnx(model, os.path.join(tmp, "model.onnx"), size, meta["resize"], meta["model"])
        files = [os.path.join(tmp, f) for f in _EXTRA_FILES] + copy_sidecars(model_url, tmp, storage_options)
        onnx_sha = _sha256(onnx_info["path"])
        identity = {"source": model_url, "onnx_sha256": onnx_sha}  # no caller's tag replaces them
        earlier = _registered_before(client, name, model_url, onnx_sha)
        if earlier is not None:  # a retried or cleared task: these weights of this run are a version already
            version, run_id = str(earlier.version), earlier.run_id
        else:
            version, run_id = _log_version(client, name, files, run_id, experiment, pyfunc_model, identity)
    version_tags = {"dataset_version": None, **_training_record(model_url, storage_options), **(tags or {}),
                    "input_size": size, "model": meta["model"], "model_widths": meta["model_widths"]}
    held = {**((earlier.tags or {}) if earlier is not None else {}), **identity}  # the identity was set at creation
    for key, value in version_tags.items():
        if value is not None and key not in held:  # an earlier registration's figures are not replaced
            client.set_model_version_tag(name, version, key, _tag_value(value))
    if description and earlier is None:
        client.update_model_version(name, version, description=description)
    return {"name": name, "version": version, "model_uri": model_uri(name, version=version), "run_id": run_id,
            "onnx_sha256": onnx_sha, "input_size": size, "registered_before": earlier is not None}


def _registered_before(client, name: str, model_url: str, onnx_sha: str):
    """The version an earlier call registered from the same run folder with the same weights (its
    ``source`` and ``onnx_sha256`` tags, given to the version when it is created), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if (v.tags or {}).get("source") == model_url
                 and (v.tags or {}).get("onnx_sha256") == onnx_sha), None)


def _log_version(client, name: str, files: list[str], run_id: str | None, experiment: str,
                 pyfunc_model: dict[str, Any], identity: dict[str, str]) -> tuple[str, str]:
    """Log the model's files as a pyfunc into ``run_id`` (or a new run of ``experiment``) and register
    them as a new version of ``name`` carrying the ``identity`` tags from its creation (a task killed
    just after leaves a version its retry finds); returns the version and the run id."""
    import mlflow

    if run_id is None:
        experiment_id = (client.get_experiment_by_name(experiment) or None)
        experiment_id = experiment_id.experiment_id if experiment_id else mlflow.create_experiment(
            experiment, artifact_location=default_artifact_location(mlflow.get_tracking_uri()))
        active = mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{name}")
    else:
        active = mlflow.start_run(run_id=run_id)
    with active as run:
        info = mlflow.pyfunc.log_model(name="model", artifacts={os.path.basename(f): f for f in files}, **pyfunc_model)
        version = mlflow.register_model(info.model_uri, name, await_registration_for=60, tags=identity)
        return str(version.version), run.info.run_id


def _training_record(model_url: str, storage_options: dict | None) -> dict[str, Any]:
    """From the run's ``result.json`` beside the model, where it has them: ``start_val_iou`` (the starting
    weights, before the first step), ``val_iou`` (after training) and the ``loss`` trained with."""
    from tasks.model.io import read_train_result

    result = read_train_result(model_url, storage_options)
    figures = {"start_val_iou": result.get("start_val_iou"), "val_iou": (result.get("metrics") or {}).get("val_iou")}
    record: dict[str, Any] = {key: float(value) for key, value in figures.items() if value is not None}
    loss = (result.get("config") or {}).get("loss")
    if loss:
        record["loss"] = str(loss)
    return record


def training_recipe(name: str = DEFAULT_MODEL_NAME, alias: str = CHAMPION,
                    tracking_uri: str | None = None) -> dict[str, Any]:
    """How the version behind ``alias`` of ``name`` was trained, read from its tags: ``{"version",
    "model", "input_size", "loss", "model_widths"}`` (``loss`` only for versions registered since it is
    tagged; ``model_widths`` None for the standard widths). {} when there is no such alias."""
    version = alias_version(name, alias, tracking_uri)
    if version is None:
        return {}
    tags = version_tags(name, version, tracking_uri)
    recipe: dict[str, Any] = {"version": version}
    if tags.get("model"):
        recipe["model"] = tags["model"]
    if tags.get("input_size"):
        recipe["input_size"] = int(float(tags["input_size"]))
    if tags.get("loss"):
        recipe["loss"] = tags["loss"]
    widths = tags.get("model_widths")
    recipe["model_widths"] = None if widths in (None, "", "null") else json.loads(widths)
    return recipe


def promotion_concerns(name: str, version: str | int, tracking_uri: str | None = None) -> list[str]:
    """Why making ``version`` the champion by hand may make production worse, read from the versions'
    tags: training lowered its val IoU below its starting weights' (the published weights or the
    champion it started from), or it scores below the champion on the test split of the same dataset
    version. [] when neither is known to be so."""
    tags = version_tags(name, version, tracking_uri)
    concerns = []
    if "start_val_iou" in tags and "val_iou" in tags and float(tags["val_iou"]) < float(tags["start_val_iou"]):
        concerns.append(f"training lowered its val IoU below its starting weights' "
                        f"({float(tags['val_iou']) * 100:.2f} % < {float(tags['start_val_iou']) * 100:.2f} %)")
    champion = alias_version(name, CHAMPION, tracking_uri)
    if champion is not None and champion != str(version) and "test_mean_iou" in tags:
        held = version_tags(name, champion, tracking_uri)
        same_data = tags.get("dataset_version") is not None and held.get("dataset_version") == tags["dataset_version"]
        if same_data and "test_mean_iou" in held and float(tags["test_mean_iou"]) < float(held["test_mean_iou"]):
            concerns.append(f"it scores below the champion (version {champion}) on the test split of dataset "
                            f"{tags.get('dataset_version')}: {float(tags['test_mean_iou']) * 100:.3f} % < "
                            f"{float(held['test_mean_iou']) * 100:.3f} %")
    return concerns


class ChampionMoved(RuntimeError):
    """The champion alias is not on the version a promotion was decided against."""


#: Tags a rolled-back champion carries (when, by whom) until it is promoted again.
ROLLBACK_TAGS = ("rolled_back_at", "rolled_back_by")

_ANY = object()  # promote(): do not check the current champion


def _history_events(client, name: str) -> tuple[list[str], list[dict]]:
    """The champion history as stored: the legacy JSON tag's stack, and the events logged after it
    (:func:`_log_history`), oldest first."""
    tags = client.get_registered_model(name).tags or {}
    legacy = [str(v) for v in json.loads(tags.get(_HISTORY_TAG, "[]"))]
    return legacy, [json.loads(tags[key]) for key in sorted(k for k in tags if k.startswith(_HISTORY_TAG + "."))]


def _history(client, name: str) -> list[str]:
    """The champions in order, oldest first: the legacy JSON tag, then the event log replayed."""
    stack, events = _history_events(client, name)
    for event in events:
        if event["event"] == "promote":
            stack.append(str(event["version"]))
        else:  # "reset": a rollback, or champions set by hand outside promote()
            stack = [str(v) for v in event["stack"]]
    return stack


def _log_history(client, name: str, event: str, version: str | None, user: str | None,
                 stack: list[str] | None = None) -> None:
    """Append one event (``promote`` of ``version``, or ``reset`` to ``stack``) to the champion
    history: a new tag, nothing is rewritten."""
    now = datetime.now(timezone.utc)
    key = f"{_HISTORY_TAG}.{now.strftime('%Y%m%dT%H%M%S%f')}.{os.urandom(4).hex()}"
    record = {"event": event, "version": version, "user": user or "bgremoval", "at": now.isoformat()}
    if stack is not None:
        record["stack"] = stack
    client.set_registered_model_tag(name, key, json.dumps(record))


def promote(name: str, version: str | int, user: str | None = None, reason: str | None = None,
            tracking_uri: str | None = None, expected_champion: str | int | None | object = _ANY) -> dict[str, str | None]:
    """Make ``version`` the champion: the alias ``champion`` moves to it and the version that held
    it gets the alias ``previous``. Promoting the current champion again changes nothing.

    ``expected_champion``: the champion the decision was made against (None: there was none); when
    given and the alias is elsewhere now, nothing changes and :class:`ChampionMoved` is raised. The
    check and the move are one step only when promotions are serialised (the training DAG's
    ``promote_model`` runs in an Airflow pool of one slot). Records ``promoted_at``/
    ``promoted_by``/``promotion_reason`` tags on the version. Returns ``{"champion": version,
    "previous": the former champion or None}``.
    """
    client = _client(tracking_uri)
    version = str(version)
    client.get_model_version(name, version)  # fails clearly for an unknown version
    current = alias_version(name, CHAMPION, tracking_uri)
    if current == version:
        return {"champion": version, "previous": alias_version(name, PREVIOUS, tracking_uri)}
    if expected_champion is not _ANY and current != (None if expected_champion is None else str(expected_champion)):
        raise ChampionMoved(f"{name}: the champion is version {current} now, not version {expected_champion} that "
                            f"version {version} was compared with; evaluate it again against the new champion")
    history = _history(client, name)
    if current is not None and (not history or history[-1] != current):  # a champion set by hand
        _log_history(client, name, "reset", None, "set by hand", stack=[*history, current])
    client.set_registered_model_alias(name, CHAMPION, version)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    _log_history(client, name, "promote", version, user)
    stamp = {"promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "promoted_by": user or "bgremoval", "promotion_reason": reason or "passed the gate"}
    for key, value in stamp.items():
        client.set_model_version_tag(name, version, key, value)
    _clear_rollback(client, name, version)
    return {"champion": version, "previous": current}


def rollback(name: str = DEFAULT_MODEL_NAME, user: str | None = None,
             tracking_uri: str | None = None) -> dict[str, str | None]:
    """Give the champion alias back to the version that held it before.

    The current champion is tagged ``rolled_back_at``/``rolled_back_by``; ``champion`` moves to
    the ``previous`` version and ``previous`` to the one before it in the promotion history (or
    is removed). Returns ``{"champion": restored, "demoted": former champion, "previous": …}``.
    Raises ``ValueError`` when there is no champion or nothing to roll back to.
    """
    client = _client(tracking_uri)
    current = alias_version(name, CHAMPION, tracking_uri)
    if current is None:
        raise ValueError(f"registered model {name!r} has no {CHAMPION!r} alias: nothing to roll back")
    history = _history(client, name)
    if not history or history[-1] != current:
        history.append(current)
    earlier = history[:-1]
    if not earlier:
        previous = alias_version(name, PREVIOUS, tracking_uri)
        if previous is None:
            raise ValueError(f"registered model {name!r} has no {PREVIOUS!r} version to roll back to "
                             f"(champion is version {current})")
        earlier = [previous]
    restored = earlier[-1]
    client.set_registered_model_alias(name, CHAMPION, restored)
    before = earlier[-2] if len(earlier) >= 2 else None
    if before is not None:
        client.set_registered_model_alias(name, PREVIOUS, before)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    _log_history(client, name, "reset", None, user, stack=earlier)  # the champion and the ones before it
    at_tag, by_tag = ROLLBACK_TAGS
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client.set_model_version_tag(name, current, at_tag, now)
    client.set_model_version_tag(name, current, by_tag, user or "bgremoval")
    _clear_rollback(client, name, restored)
    client.set_model_version_tag(name, restored, "promoted_at", now)  # champion again from now: the gate's new baseline
    client.set_model_version_tag(name, restored, "promotion_reason", f"restored by the rollback of version {current}")
    return {"champion": restored, "demoted": current, "previous": before}


def _clear_rollback(client, name: str, version: str) -> None:
    """Champion again (promoted, or restored by a rollback): the version loses its rollback tags; the
    champion history keeps the rollback."""
    for key in set(ROLLBACK_TAGS) & set(client.get_model_version(name, version).tags or {}):
        client.delete_model_version_tag(name, version, key)


def _download_registered(uri: str, dst: str) -> str:
    """MLflow's download of a ``models:/`` URI into ``dst``; ``FileNotFoundError`` naming the URI and the
    registry when the model, version or alias is not there."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(exc):  # an unknown alias: the latter
            raise
        raise FileNotFoundError(f"{uri} is not in the registry at {mlflow.get_tracking_uri()}: {first_line(exc)}") from None


def download_model(uri: str, dst_dir: str | None = None, tracking_uri: str | None = None) -> str:
    """Fetch a registered model's production files into one local folder.

    Args:
        uri: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (any MLflow model URI whose
            model was logged by :func:`register_model`).
        dst_dir: the folder to fill (created; default: a new temporary folder).

    Returns the folder, holding ``model.pt``, ``config.json``, ``model.onnx`` and, when the
    model was calibrated, ``quality.json`` and ``refinement.json``. Raises
    ``FileNotFoundError`` when the registry has no such model, version or alias, or the model lacks
    those files (it was not logged by this project).
    """
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="bgremoval-download-") as tmp:
        local = _download_registered(uri, tmp)
        dst = dst_dir or tempfile.mkdtemp(prefix="bgremoval-model-")
        os.makedirs(dst, exist_ok=True)
        missing = []
        for name in (*_EXTRA_FILES, *_OPTIONAL_FILES):
            src = next((os.path.join(local, folder, name) for folder in _FILE_FOLDERS
                        if os.path.exists(os.path.join(local, folder, name))), None)
            if src is None:
                missing += [name] if name in _EXTRA_FILES else []
                continue
            shutil.copyfile(src, os.path.join(dst, name))
    if missing:
        raise FileNotFoundError(f"{uri} has no {', '.join(missing)} among its artifacts: "
                                "register it with tasks.registry.register_model")
    return dst


def is_model_uri(url: str) -> bool:
    """True for an MLflow registry URI (``models:/…``)."""
    return str(url).startswith("models:/")



def stage_weights(reference: str, dst_url: str, name: str = DEFAULT_MODEL_NAME,
                  storage_options: dict | None = None, model: str = "u2netp") -> str:
    """Turn a model reference into a ``model.pt`` URL that every training worker can read.

    ``reference`` is ``"pretrained"`` (the published weights of architecture ``model``, converted:
    :func:`tasks.model.pretrained.write_pretrained_folder`), ``"champion"`` (or any alias name prefixed with ``@``, e.g. ``"@previous"``)
    of the registered model ``name``, a ``models:/…`` URI, or anything else (a storage URL),
    which is returned unchanged. Registry models are downloaded and their state dict written to
    ``<dst_url>/model.pt`` (local or ``s3://``, so Databricks workers read it too); returns that
    URL. Raises ``ValueError`` when the alias does not exist.
    """
    reference = reference.strip()
    if reference == PRETRAINED:
        from tasks.model.pretrained import write_pretrained_folder

        return write_pretrained_folder(dst_url, storage_options=storage_options, model=_architecture_key(model))
    if reference == CHAMPION or reference.startswith("@"):
        alias = reference.lstrip("@")
        if alias_version(name, alias) is None:
            raise ValueError(f"registered model {name!r} has no {alias!r} alias to start from")
        reference = model_uri(name, alias)
    if not is_model_uri(reference):
        return reference
    with tempfile.TemporaryDirectory(prefix="bgremoval-init-") as tmp:
        folder = download_model(reference, tmp)
        target = layout.model_weights(dst_url)
        with open(os.path.join(folder, layout.MODEL_WEIGHTS), "rb") as fh:
            storage.write_bytes(target, fh.read(), storage_options)
        with open(os.path.join(folder, layout.MODEL_CONFIG), "rb") as fh:
            storage.write_bytes(layout.model_config(dst_url), fh.read(), storage_options)
    return target


#: ``init_from`` value that picks the start weights: the champion when there is one, else the
#: published weights when the architecture has them, else random weights.
AUTO = "auto"
#: ``init_from`` values meaning random initial weights.
SCRATCH = ("", "scratch", "none")


def _architecture_key(model: str) -> str:
    return "".join(c for c in (model or "").lower() if c not in "-_ ")


def _other_architecture(recipe: dict[str, Any], key: str) -> str | None:
    """Why a version of ``recipe`` (:func:`training_recipe`) is not a ``key`` model; None when it is
    (or does not say)."""
    trained = _architecture_key(recipe.get("model", ""))
    if trained and trained != key:
        return f"version {recipe['version']} is a {recipe['model']}, this run trains a {key}"
    return None


def _champion_mismatch(name: str, key: str) -> str | None:
    """Why the champion of ``name`` cannot be the start of a standard-width ``key`` model; None when it can."""
    recipe = training_recipe(name)
    if not recipe:
        return "it has none"
    reason = _other_architecture(recipe, key)
    if reason is None and recipe["model_widths"] is not None:
        reason = f"version {recipe['version']} has custom channel widths {json.dumps(recipe['model_widths'])}"
    return reason


def choose_start(reference: str, model: str, name: str = DEFAULT_MODEL_NAME, registry: bool = True) -> str | None:
    """Resolve ``init_from``'s keywords to what :func:`stage_weights` takes, or None for random
    weights.

    ``"auto"``: ``"champion"`` when ``name`` has one of the same architecture (``model``, standard
    widths; never when ``registry`` is False: no registry is configured), else ``"pretrained"`` when
    the architecture has published weights (U2-NetP, U2-Net) and their file is on this machine, else None. ``""``, ``"scratch"``, ``"none"``: None.
    ``"pretrained"`` with an architecture without published weights raises ``ValueError``, and so
    does ``"champion"`` when the registry's champion is another architecture (its weights would not
    load into a ``model``; custom channel widths are the caller's to match). Anything else is returned as it is.
    """
    reference = (reference or "").strip()
    key = _architecture_key(model)
    if reference.lower() in SCRATCH:
        return None
    if reference == AUTO:
        reason = _champion_mismatch(name, key) if registry else "no MLflow registry is configured"
        if reason is None:
            return CHAMPION
        print(f"init_from=auto: not starting from the champion of {name!r}: {reason}")
        from tasks.model.published import PUBLISHED, find_pretrained_onnx

        return PRETRAINED if key in PUBLISHED and find_pretrained_onnx(model=key) is not None else None
    if reference == CHAMPION and registry:
        recipe = training_recipe(name)
        if _other_architecture(recipe, key) is not None:
            trained = _architecture_key(recipe["model"])
            raise ValueError(f"init_from=champion: the champion of {name!r} is a {trained}, this run trains a "
                             f"{key}: set the model to {trained}, or start from pretrained or scratch")
    if reference == PRETRAINED:
        from tasks.model.published import PUBLISHED

        if key not in PUBLISHED:
            raise ValueError(f"published weights exist for {', '.join(PUBLISHED)} only, not {model!r}: "
                             "use init_from=scratch or a model file")
    return reference


def start_weights(init_from: str, model: str, name: str, run_url: str, storage_options: dict | None = None,
                  registry: bool = True) -> tuple[str | None, str | None]:
    """The weights a training run starts from: ``(reference, url)``, where ``reference`` is what
    ``init_from`` resolved to (:func:`choose_start`) and ``url`` the ``model.pt`` its workers read,
    staged under ``run_url``'s ``init/`` when it comes from the registry or the published weights
    (:func:`stage_weights`); ``(None, None)`` for random weights."""
    reference = choose_start(init_from, model, name, registry=registry)
    if not reference:
        return None, None
    return reference, stage_weights(reference, layout.initial_weights(run_url), name, storage_options, model=model)


def list_versions(name: str = DEFAULT_MODEL_NAME, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of ``name``, newest first: ``{"version", "aliases", "tags", "created", "run_id"}``.
    Raises ``ValueError`` when the registered model does not exist."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        import mlflow

        raise ValueError(f"no registered model {name!r} on {mlflow.get_tracking_uri()}") from exc
    # The registered model's alias table: the versions search_model_versions returns carry none.
    aliases: dict[str, list[str]] = {}
    for alias, version in sorted((registered.aliases or {}).items()):
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in client.search_model_versions(f"name = '{name}'"):
        created = datetime.fromtimestamp(v.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds")
        rows.append({"version": str(v.version), "aliases": aliases.get(str(v.version), []), "tags": dict(v.tags or {}),
                     "created": created, "run_id": v.run_id})
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


#: How a promotion by hand starts its ``promotion_reason`` (``bgremoval model promote``).
BY_HAND = "promoted by hand"
#: Version tag: digest of the test photos a version's ``test_*`` figures were measured on.
TEST_SPLIT_TAG = "test_split_sha256"


def best_champion(name: str, test_split_sha256: str, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """``{"version", "mean_iou"}`` of the version that scored best on these test pairs (its
    :data:`TEST_SPLIT_TAG`) among the champions since the last intervention by hand, rolled-back ones
    left out; None when there is none. An intervention sets a new baseline: a promotion by hand; a
    rollback, or the alias moved outside :func:`promote` (the champion history's resets: the version
    they left as champion counts, and those promoted after it); the alias moved and not yet seen by
    :func:`promote` (the champion is not the last version promoted: only it counts)."""
    try:
        rows = list_versions(name, tracking_uri)
    except ValueError:
        return None
    promoted = {r["version"]: at for r in rows if (at := _instant(r["tags"].get("promoted_at"))) is not None}
    champion = next((r["version"] for r in rows if CHAMPION in r["aliases"]), None)
    interventions = [(promoted[r["version"]], r["version"]) for r in rows if r["version"] in promoted
                     and r["tags"].get("promotion_reason", "").startswith(BY_HAND)]
    interventions += [(at, stack[-1] if stack else None) for at, stack in _resets(name, tracking_uri)]
    since, baseline = max(interventions, key=lambda i: i[0], default=(datetime.min.replace(tzinfo=timezone.utc), None))
    moved_by_hand = champion is not None and promoted and promoted.get(champion) != max(promoted.values())
    held = [(float(r["tags"]["test_mean_iou"]), r["version"]) for r in rows
            if r["tags"].get(TEST_SPLIT_TAG) == test_split_sha256 and "test_mean_iou" in r["tags"]
            and r["version"] in promoted and (promoted[r["version"]] >= since or r["version"] == baseline)
            and ROLLBACK_TAGS[0] not in r["tags"] and (not moved_by_hand or r["version"] == champion)]
    if not held:
        return None
    mean_iou, version = max(held)
    return {"version": version, "mean_iou": mean_iou}


def _resets(name: str, tracking_uri: str | None) -> list[tuple[datetime, list[str]]]:
    """``(when, the champion stack it left)`` of each reset in the champion history (a rollback, or a
    champion found set by hand)."""
    _, events = _history_events(_client(tracking_uri), name)
    return [(at.replace(microsecond=0), [str(v) for v in e.get("stack") or []]) for e in events  # as promoted_at
            if e.get("event") == "reset" and (at := _instant(e.get("at"))) is not None]


def _instant(stamp: str | None) -> datetime | None:
    """A tag's ISO time as an aware UTC datetime (a trailing ``Z`` or another offset read too); None
    for a missing or unreadable one (a tag edited by hand)."""
    try:
        parsed = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def rolled_back_versions(name: str = DEFAULT_MODEL_NAME, tracking_uri: str | None = None) -> list[str]:
    """The versions of ``name`` that were rolled back and not promoted again (they carry
    :data:`ROLLBACK_TAGS`); [] when the registered model does not exist."""
    try:
        rows = list_versions(name, tracking_uri)
    except ValueError:
        return []
    return [row["version"] for row in rows if ROLLBACK_TAGS[0] in row["tags"]]


def version_tags(name: str, version: str | int, tracking_uri: str | None = None) -> dict[str, str]:
    """The tags of one model version (e.g. ``dataset_version``, ``test_mean_iou``)."""
    return dict(_client(tracking_uri).get_model_version(name, str(version)).tags or {})
