"""bgremoval: background removal for fashion product photos (Airflow-free domain library)."""
