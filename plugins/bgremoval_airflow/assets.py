"""The Airflow Assets the bgremoval DAGs share (URIs from :mod:`tasks.core.layout`, bucket from settings)."""

from __future__ import annotations

from airflow.sdk import Asset
from bgremoval_airflow.settings import configured_bucket

from tasks.core import layout

RETRAINING_POOL_ASSET_NAME = "bgremoval_retraining_pool"

#: Updated by ``bgremoval_inference`` when it publishes cut-outs; schedules ``bgremoval_retraining``.
retraining_pool = Asset(name=RETRAINING_POOL_ASSET_NAME, uri=layout.asset_uri(configured_bucket(), layout.RETRAINING_POOL))
