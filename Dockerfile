# The bgremoval image: Airflow 3 (api-server, scheduler, dag-processor, triggerer, Celery worker), the
# `tasks` library, torch (CPU build) and the MLflow server, all from the project's pinned dependencies.
# docker-compose.yaml builds it once and runs every Airflow service and the MLflow server from it.
#
#   docker compose build                                   # or: docker build -t bgremoval:0.1.0 .
#   docker compose build --build-arg WITH_HOROVOD=true     # also build Horovod 0.28.1 (about 5 min more)
#
# Same install order as scripts/install.sh: torch alone first (here from the CPU index, so no CUDA
# wheels are pulled), then the project with its Airflow extra (which includes training) and
# `pip install -c constraints.txt`.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# true: build Horovod 0.28.1 from its sdist with scripts/install-horovod.sh (needs a compiler).
ARG WITH_HOROVOD=false
ARG AIRFLOW_UID=50000

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/airflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    BGREMOVAL_CACHE=/opt/airflow/cache \
    BGREMOVAL_PRETRAINED_DIR=/opt/bgremoval/pretrained \
    PATH=/opt/bgremoval/.venv/bin:$PATH

# curl for the health checks, tini as PID 1 (forwards SIGTERM: Celery's warm shutdown), procps for
# `ps` when debugging; libgomp for torch/scikit-learn, libglib for OpenCV.
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl tini procps libgomp1 libglib2.0-0 \
 && if [ "$WITH_HOROVOD" = "true" ]; then apt-get install -y --no-install-recommends build-essential cmake git; fi \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --uid "$AIRFLOW_UID" --gid 0 --home-dir /opt/airflow --create-home --shell /bin/bash airflow

WORKDIR /opt/bgremoval
RUN python -m venv .venv \
 && pip install --upgrade "pip>=24" \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Dependencies first (cached while only the code changes), then the project itself.
COPY pyproject.toml constraints.txt README.md ./
COPY scripts/ ./scripts/
COPY tasks/ ./tasks/
RUN pip install -c constraints.txt ".[airflow,openvino]" \
 && if [ "$WITH_HOROVOD" = "true" ]; then scripts/install-horovod.sh; fi \
 && python -c "import airflow.providers.celery.executors.celery_executor, airflow.providers.amazon, airflow.providers.databricks, mlflow, psycopg2, torch, tasks; print('image ok: torch', torch.__version__)" \
 && bgremoval pretrained fetch

# DAGs and plugins are baked in (docker-compose.yaml also mounts ./dags and ./plugins over them,
# so an edit is picked up without a rebuild); `tasks` is installed above.
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
RUN mkdir -p /opt/airflow/logs /opt/airflow/cache /opt/airflow/auth \
 && chown -R airflow:0 /opt/airflow && chmod -R g+rwX /opt/airflow

USER airflow
WORKDIR /opt/airflow
EXPOSE 8080 5000 8793 8794 8974
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["airflow", "version"]
