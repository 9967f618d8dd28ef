"""The sensors the DAGs wait on."""

from bgremoval_airflow.sensors import READY_POKE_INTERVAL_S, READY_TIMEOUT_S, ready_marker_sensor


def test_the_ready_sensor_waits_deferred_on_the_runs_bucket_through_aws_default():
    sensor = ready_marker_sensor("wait_for_batch", "raw/{{ params.batch }}/_READY")
    assert (sensor.task_id, sensor.aws_conn_id, sensor.bucket_name) == ("wait_for_batch", "aws_default",
                                                                       "{{ params.bucket }}")
    assert sensor.bucket_key == "raw/{{ params.batch }}/_READY"
    assert sensor.deferrable and sensor.poke_interval == READY_POKE_INTERVAL_S
    assert sensor.timeout == READY_TIMEOUT_S == 6 * 60 * 60
