"""The AWS connection as storage options: from the connection, and a clear error without one."""

from __future__ import annotations

import pytest
from bgremoval_airflow.connections import s3_storage_options


def test_the_connection_gives_the_endpoint_and_keys(s3_bucket):
    _, options = s3_bucket  # the fixture points AIRFLOW_CONN_AWS_DEFAULT at the moto server
    from_airflow = s3_storage_options()
    assert from_airflow["key"] == options["key"] and from_airflow["secret"] == options["secret"]
    assert from_airflow["client_kwargs"]["endpoint_url"] == options["client_kwargs"]["endpoint_url"]


def test_no_connection_and_no_credentials_is_a_clear_error(monkeypatch, tmp_path):
    for name in ("AIRFLOW_CONN_AWS_DEFAULT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ValueError, match="no AWS credentials for the Airflow connection 'aws_default'"):
        s3_storage_options()
