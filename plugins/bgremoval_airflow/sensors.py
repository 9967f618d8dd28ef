"""The sensors the DAGs wait on: a batch's ``_READY`` marker in the bucket."""

from __future__ import annotations

from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor

from bgremoval_airflow.connections import AWS_CONN_ID

#: How often a waiting sensor looks for the marker (it waits in the triggerer, deferred).
READY_POKE_INTERVAL_S = 10
#: How long a run waits for its batch before the sensor fails it.
READY_TIMEOUT_S = 6 * 60 * 60


def ready_marker_sensor(task_id: str, bucket_key: str) -> S3KeySensor:
    """A deferrable sensor on ``bucket_key`` (a templated ``_READY`` key) in the run's ``params.bucket``,
    through the ``aws_default`` connection."""
    return S3KeySensor(
        task_id=task_id,
        aws_conn_id=AWS_CONN_ID,
        bucket_name="{{ params.bucket }}",
        bucket_key=bucket_key,
        poke_interval=READY_POKE_INTERVAL_S,
        timeout=READY_TIMEOUT_S,
        deferrable=True,
    )
