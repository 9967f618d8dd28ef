"""The deployment's settings for bgremoval, read from Airflow's configuration.

``[bgremoval] bucket`` (or the environment variable ``AIRFLOW__BGREMOVAL__BUCKET``) names the bucket
that holds the storage layout (:mod:`tasks.core.layout`); the DAGs' Asset URIs, the ``bucket``
parameter's default and the pages' default bucket all come from it. ``[bgremoval] buckets``
(``AIRFLOW__BGREMOVAL__BUCKETS``, comma-separated names or ``fnmatch`` patterns such as
``studio-*``) names further buckets the web pages may show; a page asked for any other bucket
answers 400, so nobody can read or write another bucket through the
server's credentials. ``[bgremoval] failure_email`` (comma-separated addresses) and
``[bgremoval] smtp_conn_id`` (default ``smtp_default``) send a mail for every failed task besides the
log line (:mod:`bgremoval_airflow.operations`). ``[bgremoval] reviewers`` (comma-separated user
names) are the people the cluster review is assigned to (anyone with access when empty), and
``[bgremoval] review_timeout_hours`` (72) how long it waits before it counts as rejected.
``[bgremoval] registered_model`` (``AIRFLOW__BGREMOVAL__REGISTERED_MODEL``) is the MLflow registered
model the DAGs' ``registered_model`` parameter defaults to (``bgremoval-u2net``), so that the runs the
scheduler starts by itself use it too. ``[bgremoval] training_deadline_hours`` turns on the training DAG's deadline alert: a run not finished
that many hours after it was queued is reported (0, the default: no deadline; the compose file sets
108 h, the review's 72 h plus a day and a half). It is off by default because Airflow 3.3's
``dag.test()`` / ``airflow dags test`` — how ``make demo`` and the tests run the training DAG — fails
at the end of a successful run of a DAG with a deadline (the test path hands the scheduler the
serialised alerts where it expects their database ids); the scheduler's own path is unaffected and
tested (tests/integration/test_celery_postgres.py).
"""

from __future__ import annotations

import fnmatch

from pathlib import Path

from tasks.core import layout

#: The Airflow pools the DAGs use, as ``airflow pools import`` reads them (the embedded stack and the
#: compose file's airflow-init import this file).
POOLS_FILE = Path(__file__).with_name("pools.json")
#: One slot: promotions run one at a time (the champion check and the alias move are one step).
PROMOTION_POOL = "bgremoval_promotion"


def configured_registered_model() -> str:
    """The MLflow registered model the DAGs use unless a run names another: ``[bgremoval]
    registered_model`` (``AIRFLOW__BGREMOVAL__REGISTERED_MODEL``), else
    ``tasks.registry.DEFAULT_MODEL_NAME``. Runs the scheduler starts by itself (a drop's inference,
    the retraining the pool schedules) take this one."""
    from airflow.configuration import conf

    from tasks.registry import DEFAULT_MODEL_NAME

    return conf.get("bgremoval", "registered_model", fallback=DEFAULT_MODEL_NAME) or DEFAULT_MODEL_NAME


def configured_bucket() -> str:
    """The bucket of this deployment: ``[bgremoval] bucket``, else ``tasks.core.layout.DEFAULT_BUCKET``."""
    from airflow.configuration import conf

    return conf.get("bgremoval", "bucket", fallback=layout.DEFAULT_BUCKET) or layout.DEFAULT_BUCKET


def api_base_url() -> str:
    """The Airflow UI's public address (``[api] base_url``) without a trailing slash ("" when unset)."""
    from airflow.configuration import conf

    return conf.get("api", "base_url", fallback="").rstrip("/")


def max_map_length() -> int:
    """How many task instances Airflow maps at most (``[core] max_map_length``): the planners cut
    work into at most this many shards."""
    from airflow.configuration import conf

    return conf.getint("core", "max_map_length", fallback=1024)


def served_buckets() -> tuple[str, ...]:
    """The buckets the web pages may show: :func:`configured_bucket`, then the names and patterns of
    ``[bgremoval] buckets``."""
    from airflow.configuration import conf

    extra = conf.get("bgremoval", "buckets", fallback="") or ""
    return (configured_bucket(), *(name.strip() for name in extra.split(",") if name.strip()))


def is_served_bucket(bucket: str) -> bool:
    """Whether the web pages may show ``bucket`` (:func:`served_buckets`; patterns as ``fnmatch``)."""
    return any(fnmatch.fnmatchcase(bucket, allowed) for allowed in served_buckets())


def failure_recipients() -> tuple[str, ...]:
    """Who gets a mail when a task fails: ``[bgremoval] failure_email``, comma-separated (none by default)."""
    from airflow.configuration import conf

    value = conf.get("bgremoval", "failure_email", fallback="") or ""
    return tuple(address.strip() for address in value.split(",") if address.strip())


def smtp_conn_id() -> str:
    """The SMTP connection failure mails go through: ``[bgremoval] smtp_conn_id`` (``smtp_default``)."""
    from airflow.configuration import conf

    return conf.get("bgremoval", "smtp_conn_id", fallback="smtp_default") or "smtp_default"


def reviewers() -> tuple[str, ...]:
    """The users the cluster review is assigned to: ``[bgremoval] reviewers``, comma-separated (none: anyone)."""
    from airflow.configuration import conf

    value = conf.get("bgremoval", "reviewers", fallback="") or ""
    return tuple(name.strip() for name in value.split(",") if name.strip())


def review_timeout_hours() -> float:
    """How long the cluster review waits for a decision: ``[bgremoval] review_timeout_hours`` (72)."""
    from airflow.configuration import conf

    return conf.getfloat("bgremoval", "review_timeout_hours", fallback=72.0)


def training_deadline_hours() -> float:
    """Hours after its queueing when an unfinished training run is overdue: ``[bgremoval]
    training_deadline_hours``; 0 (the default) means no deadline."""
    from airflow.configuration import conf

    return conf.getfloat("bgremoval", "training_deadline_hours", fallback=0.0)
