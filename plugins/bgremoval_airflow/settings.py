"""The deployment's settings for bgremoval, read from Airflow's configuration.

``[bgremoval] bucket`` (or the environment variable ``AIRFLOW__BGREMOVAL__BUCKET``) names the bucket
that holds the storage layout (:mod:`tasks.core.layout`); the DAGs' Asset URIs, the ``bucket``
parameter's default and the pages' default bucket all come from it.
"""

from __future__ import annotations

from tasks.core import layout


def configured_bucket() -> str:
    """The bucket of this deployment: ``[bgremoval] bucket``, else ``tasks.core.layout.DEFAULT_BUCKET``."""
    from airflow.configuration import conf

    return conf.get("bgremoval", "bucket", fallback=layout.DEFAULT_BUCKET) or layout.DEFAULT_BUCKET


def api_base_url() -> str:
    """The Airflow UI's public address (``[api] base_url``) without a trailing slash ("" when unset)."""
    from airflow.configuration import conf

    return conf.get("api", "base_url", fallback="").rstrip("/")
