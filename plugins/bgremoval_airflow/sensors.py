"""The sensors the DAGs wait on: a batch's ``_READY`` marker in the bucket."""

from __future__ import annotations

from typing import Any

from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor

from bgremoval_airflow.connections import AWS_CONN_ID

#: How often a waiting sensor looks for the marker (it waits in the triggerer, deferred).
READY_POKE_INTERVAL_S = 10
#: How long a run waits for its batch before the sensor fails it.
READY_TIMEOUT_S = 6 * 60 * 60


class ReadyMarkerSensor(S3KeySensor):
    """:class:`S3KeySensor` that first checks that the bucket exists: a mistyped bucket in the form
    fails the run at once, instead of waiting out :data:`READY_TIMEOUT_S` for a marker that cannot come."""

    def execute(self, context: Any) -> None:
        from airflow.sdk.exceptions import AirflowFailException
        from botocore.exceptions import ClientError

        try:
            self.hook.get_conn().head_bucket(Bucket=self.bucket_name)
        except ClientError as exc:  # only a bucket known not to exist: a refused HEAD (403) waits as before
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                raise AirflowFailException(f"bucket {self.bucket_name!r} does not exist (connection "
                                           f"{self.aws_conn_id!r}): check the run's bucket parameter") from exc
        super().execute(context)


def ready_marker_sensor(task_id: str, bucket_key: str) -> S3KeySensor:
    """A deferrable sensor on ``bucket_key`` (a templated ``_READY`` key) in the run's ``params.bucket``,
    through the ``aws_default`` connection; a bucket that does not exist fails it at once."""
    return ReadyMarkerSensor(
        task_id=task_id,
        aws_conn_id=AWS_CONN_ID,
        bucket_name="{{ params.bucket }}",
        bucket_key=bucket_key,
        poke_interval=READY_POKE_INTERVAL_S,
        timeout=READY_TIMEOUT_S,
        deferrable=True,
    )
