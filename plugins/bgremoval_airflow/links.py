"""Absolute links to the bgremoval pages, for task logs and the review gate's text."""

from __future__ import annotations

from urllib.parse import quote

from bgremoval_airflow.settings import api_base_url


def review_page_url(version: str, bucket: str) -> str:
    """The review page of a dataset version (clusters: rename, move images)."""
    return f"{api_base_url()}/bgremoval/review/{quote(version)}?bucket={quote(bucket)}"


def mask_review_page_url(version: str, bucket: str) -> str:
    """The page that lists a dataset version's flagged masks (Keep / Exclude / Fix)."""
    return f"{api_base_url()}/bgremoval/review/{quote(version)}/masks?bucket={quote(bucket)}"


def report_page_url(version: str, run: str, bucket: str) -> str:
    """The evaluation report of a training run (``run`` as :func:`tasks.core.layout.run_name` makes it)."""
    return f"{api_base_url()}/bgremoval/reports/{quote(version)}/{quote(run)}?bucket={quote(bucket)}"
