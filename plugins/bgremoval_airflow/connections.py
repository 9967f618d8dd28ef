"""Turn Airflow connections into the ``storage_options`` that ``tasks.core.storage`` passes to fsspec."""

from __future__ import annotations

AWS_CONN_ID = "aws_default"


def s3_storage_options(aws_conn_id: str = AWS_CONN_ID) -> dict:
    """Return s3fs ``storage_options`` for the Airflow AWS connection ``aws_conn_id``.

    Credentials come from the connection through the Amazon provider (so role assumption and
    profiles work as they do for every other AWS task); the S3 endpoint (MinIO, moto, a VPC
    endpoint) from the connection's ``endpoint_url`` extra or its ``service_config.s3`` section.
    Raises ``ValueError`` naming the connection when no credentials are found at all.
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from tasks.core.storage import s3_storage_options as build

    hook = S3Hook(aws_conn_id=aws_conn_id)
    try:
        credentials = hook.get_credentials()
    except AttributeError as exc:  # boto found no credentials anywhere: the provider then reads None's
        raise ValueError(f"no AWS credentials for the Airflow connection {aws_conn_id!r}: define it (Admin → "
                         f"Connections, or AIRFLOW_CONN_{aws_conn_id.upper()}) with the S3 keys and, for MinIO, "
                         "the endpoint_url extra, or give the workers an AWS role") from exc
    options = build(
        endpoint_url=hook.conn_config.get_service_endpoint_url("s3"),
        key=credentials.access_key,
        secret=credentials.secret_key,
        region=hook.conn_config.region_name,
    )
    if credentials.token:
        options["token"] = credentials.token
    return options
