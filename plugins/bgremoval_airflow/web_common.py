"""What the plugin's web pages share: the training DAG they guard, bucket-name validation and
the S3 options from the ``aws_default`` connection (cached a few minutes).

Used by :mod:`bgremoval_airflow.review_app` (which assembles the app), and by the routers it
includes, :mod:`bgremoval_airflow.correction_app` and :mod:`bgremoval_airflow.report_app`.
"""

from __future__ import annotations

import functools
import re
import time

from bgremoval_airflow.connections import s3_storage_options

__all__ = ["BUCKET_NAME", "TRAINING_DAG_ID", "current_storage_options"]

#: The DAG whose permissions guard the pages (read access to look, HITL answers to change).
TRAINING_DAG_ID = "bgremoval_training"
#: A valid S3 bucket name (what ``?bucket=`` may hold).
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@functools.lru_cache(maxsize=4)
def _storage_options_cached(minute: int) -> dict:
    return s3_storage_options()


def current_storage_options() -> dict:
    """S3 options from the ``aws_default`` connection, refreshed every few minutes (expiring roles)."""
    return _storage_options_cached(int(time.time() // 300))
