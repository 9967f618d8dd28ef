"""What the plugin's web pages share: the DAGs whose permissions guard them, validation of the names
that arrive in a URL (bucket, dataset version, image key) and the storage locations they lead to,
the S3 options from the ``aws_default`` connection (cached a few minutes), and the Jinja2 templates.

Used by the routers :mod:`bgremoval_airflow.web.clusters`, :mod:`bgremoval_airflow.web.masks`,
:mod:`bgremoval_airflow.web.corrections` and :mod:`bgremoval_airflow.web.reports`, which
:mod:`bgremoval_airflow.web.app` assembles.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from pathlib import Path

import jinja2
from fastapi import Depends, HTTPException

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from bgremoval_airflow.connections import s3_storage_options
from bgremoval_airflow.settings import configured_bucket, is_served_bucket
from tasks.core import layout

__all__ = [
    "BUCKET_NAME",
    "DATASET_VERSION",
    "IMAGE_KEY",
    "TEMPLATES_DIR",
    "TRAINING_DAG_ID",
    "answer_errors",
    "bucket_url",
    "can_read_training",
    "can_review_training",
    "check_key",
    "current_storage_options",
    "dataset_url",
    "default_bucket",
    "load_review_state",
    "render_page",
    "review_errors",
    "run_conf",
]

#: The DAG whose permissions guard the dataset pages (read access to look, HITL answers to change).
TRAINING_DAG_ID = "bgremoval_training"
#: A valid S3 bucket name (what ``?bucket=`` may hold).
BUCKET_NAME = re.compile(layout.BUCKET_NAME_PATTERN)
#: A dataset version as it appears in a page's path.
DATASET_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
#: The key of a clean pair as it appears in a path (no ``/``, no ``..`` tricks beyond a plain name).
IMAGE_KEY = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
#: Where the pages' Jinja2 templates live (shipped inside the plugins folder, next to this module).
TEMPLATES_DIR = Path(__file__).parent / "templates"

#: Route dependency: read access to the training DAG (look at clusters, masks, reports).
can_read_training = Depends(requires_access_dag("GET", param_dag_id=TRAINING_DAG_ID))
#: Route dependency: the right to answer the training DAG's human-in-the-loop tasks (save a review).
can_review_training = Depends(requires_access_dag("PUT", DagAccessEntity.HITL_DETAIL, param_dag_id=TRAINING_DAG_ID))

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=jinja2.StrictUndefined
)


@functools.lru_cache(maxsize=4)
def _storage_options_cached(minute: int) -> dict:
    return s3_storage_options()


def current_storage_options() -> dict:
    """S3 options from the ``aws_default`` connection, refreshed every few minutes (expiring roles),
    with a bounded, expiring listings cache."""
    return _storage_options_cached(int(time.time() // 300))


def run_conf(dag_id: str, run_id: str) -> dict | None:
    """The ``conf`` an Airflow run was triggered with (``{}`` when none), from the metadata
    database; None when there is no such run."""
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        found = session.execute(select(DagRun.conf).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).first()
    return None if found is None else dict(found[0] or {})


def default_bucket() -> str:
    """The bucket a page shows when the URL names none: the deployment's ``[bgremoval] bucket``."""
    return configured_bucket()


def bucket_url(bucket: str) -> str:
    """The bucket's root URL (:func:`tasks.core.layout.bucket_url`) of a bucket this deployment serves
    (:func:`bgremoval_airflow.settings.is_served_bucket`); 400 for any other name."""
    if not BUCKET_NAME.match(bucket):
        raise HTTPException(status_code=400, detail=f"invalid bucket name {bucket!r}")
    if not is_served_bucket(bucket):
        raise HTTPException(status_code=400, detail=f"bucket {bucket!r} is not served here ([bgremoval] buckets)")
    return layout.bucket_url(bucket)


def dataset_url(version: str, bucket: str) -> str:
    """The folder of a dataset version (:func:`tasks.core.layout.dataset`) after validating both names
    (400 otherwise: no path tricks)."""
    if not DATASET_VERSION.match(version):
        raise HTTPException(status_code=400, detail=f"invalid dataset version {version!r}")
    return layout.dataset(bucket_url(bucket), version)


def check_key(key: str) -> str:
    """``key`` when it is a plausible clean-pair key, else a 400."""
    if not IMAGE_KEY.match(key):
        raise HTTPException(status_code=400, detail="invalid key")
    return key


def load_review_state(version: str, bucket: str):
    """The review state of a dataset version (:func:`tasks.data.review.load_review_state`); 404 when
    the version has no proposed clusters."""
    from tasks.data.review import load_review_state as load

    try:
        return load(dataset_url(version, bucket), current_storage_options())
    except FileNotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


@contextlib.contextmanager
def answer_errors(statuses: dict[type[Exception], int]):
    """Turn the exceptions named in ``statuses`` (checked in order) into HTTP answers with their
    message as ``detail``."""
    try:
        yield
    except tuple(statuses) as exc:
        status = next(code for kind, code in statuses.items() if isinstance(exc, kind))
        raise HTTPException(status_code=status, detail=str(exc)) from None


def review_errors():
    """Answer a review write's refusals as HTTP: an unfit change 422, a closed (approved) review 409,
    an unknown dataset or pair 404."""
    from tasks.data.review import CorrectionError, ReviewClosed

    return answer_errors({CorrectionError: 422, ReviewClosed: 409, FileNotFoundError: 404})


def page_count(total: int, per_page: int) -> int:
    """How many pages of ``per_page`` rows ``total`` rows fill (at least one, for the empty list)."""
    return max(1, -(-total // per_page))


def render_page(template: str, **context) -> str:
    """Render one of the pages' templates (autoescaped; values for scripts go through ``|tojson``)."""
    return _templates.get_template(template).render(**context)
