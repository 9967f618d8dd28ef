"""The sensors the DAGs wait on."""

import pytest
from bgremoval_airflow.sensors import READY_POKE_INTERVAL_S, READY_TIMEOUT_S, ready_marker_sensor


def test_the_ready_sensor_waits_deferred_on_the_runs_bucket_through_aws_default():
    sensor = ready_marker_sensor("wait_for_batch", "raw/{{ params.batch }}/_READY")
    assert (sensor.task_id, sensor.aws_conn_id, sensor.bucket_name) == ("wait_for_batch", "aws_default",
                                                                       "{{ params.bucket }}")
    assert sensor.bucket_key == "raw/{{ params.batch }}/_READY"
    assert sensor.deferrable and sensor.poke_interval == READY_POKE_INTERVAL_S
    assert sensor.timeout == READY_TIMEOUT_S == 6 * 60 * 60


def test_a_bucket_that_does_not_exist_fails_at_once_and_an_existing_one_waits_deferred(s3_bucket):
    from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

    bucket_url, _ = s3_bucket  # the fixture points aws_default at the moto server
    sensor = ready_marker_sensor("wait_for_drop", "incoming/drop-1/_READY")
    sensor.bucket_name = "no-such-bucket-x"
    with pytest.raises(AirflowFailException, match="bucket 'no-such-bucket-x' does not exist"):
        sensor.execute({})
    sensor = ready_marker_sensor("wait_for_drop", "incoming/drop-1/_READY")
    sensor.bucket_name = bucket_url.removeprefix("s3://")
    with pytest.raises(TaskDeferred):  # no marker yet: it waits in the triggerer
        sensor.execute({})
