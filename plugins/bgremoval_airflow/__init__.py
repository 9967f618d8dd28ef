"""Airflow-specific glue shared by the bgremoval DAGs (connections, params, review web app)."""
