"""The registered model served by MLflow itself: ``mlflow models serve -m models:/<name>@champion``
in a child process on loopback, image bytes in (base64 JSON), cut-out bytes out."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from tasks import registry
from tasks.dev import stack
from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
from tasks.serving.mlflow_model import pyfunc_model

pytestmark = pytest.mark.process


def test_mlflow_models_serve_runs_the_champion_on_image_bytes(tmp_path, private_mlflow, write_model_folder):
    with private_mlflow(tmp_path, "served") as run_id:
        registered = registry.register_model(write_model_folder(tmp_path / "run"), "pyfunc-served", run_id=run_id,
                                             pyfunc_model=pyfunc_model())
        registry.promote("pyfunc-served", registered["version"])
        port, log = stack.free_port(), tmp_path / "serve.log"
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [str(mlflow_cli), "models", "serve", "-m", "models:/pyfunc-served@champion", "--env-manager", "local",
                 "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": "",  # as in an activated venv: MLflow execs uvicorn from PATH
                                                  "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            stack.wait_http(f"{url}/ping", 180, server, log, status=200)
            item = render_item(0, SynthConfig(n=1, seed=3, max_side=120))
            photo = encode_jpeg(item.image)
            body = {"dataframe_records": [{"image": base64.b64encode(photo).decode()},
                                          {"image": base64.b64encode(b"zero").decode()}],
                    "params": {"output": "jpeg", "background": "#00ff00"}}
            response = httpx.post(f"{url}/invocations", json=body, timeout=60)
            assert response.status_code == 200, response.text
            good, bad = response.json()["predictions"]
            jpeg = cv2.imdecode(np.frombuffer(base64.b64decode(good["output"]), np.uint8), cv2.IMREAD_COLOR)
            assert jpeg.shape[:2] == item.image.shape[:2] and good["media_type"] == "image/jpeg"
            assert good["error"] == "" and 0 <= good["quality"] <= 1
            assert bad["output"] == "" and "not an image" in bad["error"]

            wrong = httpx.post(f"{url}/invocations", json={**body, "params": {"output": "gif"}}, timeout=60)
            assert wrong.status_code == 400 and "output must be one of" in wrong.text
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
