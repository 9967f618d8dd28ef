"""What the commands read from their surroundings: object-store credentials and the MLflow registry,
from the environment or from a running embedded stack (``bgremoval stack up``)."""

from __future__ import annotations

import os

from tasks.core.errors import first_line

__all__ = ["first_line", "mlflow_environment", "registry_missing", "registry_missing_for", "storage_options",
           "store_missing"]


def storage_options(url: str) -> dict | None:
    """s3fs options from the environment (or a running embedded stack) for ``s3://`` URLs; None for others."""
    if not url.startswith("s3://"):
        return None
    from tasks.core import storage
    from tasks.dev.stack_env import read_env_file

    return storage.storage_options_from_env({**read_env_file(), **os.environ})


def mlflow_environment() -> None:
    """Point MLflow at the embedded stack's store when no MLFLOW_TRACKING_URI is set, with the stack's
    artifact root for the experiments a command creates there (as the stack's own runs have). A
    relative local store (``sqlite:///mlflow.db``) is made absolute here, against the folder the
    command was started in: the training workers run in the project folder."""
    from tasks.dev.stack_env import read_env_file
    from tasks.registry import absolute_tracking_uri

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        stack = read_env_file()
        if stack.get("MLFLOW_TRACKING_URI"):
            os.environ["MLFLOW_TRACKING_URI"] = stack["MLFLOW_TRACKING_URI"]
            if stack.get("BGREMOVAL_MLFLOW_ARTIFACTS") and not os.environ.get("BGREMOVAL_MLFLOW_ARTIFACTS"):
                os.environ["BGREMOVAL_MLFLOW_ARTIFACTS"] = stack["BGREMOVAL_MLFLOW_ARTIFACTS"]
    if os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = absolute_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


def registry_missing() -> str | None:
    """Why a command that needs the MLflow registry cannot reach one, or None when one is configured.
    Without this check MLflow would quietly create an empty ``mlflow.db`` in the working folder."""
    mlflow_environment()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return "no MLflow registry is configured: set MLFLOW_TRACKING_URI (or start the embedded stack: bgremoval stack up)"


def registry_missing_for(model: str) -> str | None:
    """:func:`registry_missing` for a registered model (``models:/...``), or :func:`store_missing`; None for
    any other model source."""
    from tasks.registry import is_model_uri

    return (registry_missing() or store_missing()) if is_model_uri(model) else None


def store_missing() -> str | None:
    """Why a command that only reads the registry finds nothing to read: its local SQLite store does not
    exist (reading would create an empty one, often in the wrong folder); None otherwise."""
    from tasks.registry import missing_store

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if store := missing_store(uri):
        return f"the MLflow store {store} does not exist (MLFLOW_TRACKING_URI={uri}; a relative path is read " \
               f"from the folder the command runs in)"
    return None
