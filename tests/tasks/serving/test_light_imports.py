"""Cutting out needs neither torch nor MLflow nor Airflow (nor the stack's psutil): ``bgremoval remove``, ``pretrained path`` and the HTTP
service run in a process where importing them fails (the first step of a light install)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
from tasks.model.export import export_onnx
from tasks.model.u2net import U2Net
from tasks.train.config import TrainConfig

pytestmark = pytest.mark.process

PROJECT = Path(__file__).resolve().parents[3]
BLOCKER = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "mlflow", "airflow", "torchvision", "pandas", "pyarrow", "sklearn",
                                  "matplotlib", "moto", "tensorboard", "celery", "psutil"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Blocked())
"""


def test_remove_and_serve_run_without_torch_mlflow_or_airflow(tmp_path):
    config = TrainConfig(dataset_url="-", output_url="-", model_widths={"encoder": [[4, 8]] * 6,
                                                                        "decoder": [[4, 8]] * 5})
    torch.manual_seed(0)
    export_onnx(U2Net(config.model_config()).eval(), str(tmp_path / "model.onnx"), 32, model_name="u2netp")
    item = render_item(0, SynthConfig(n=1, seed=1, max_side=96))
    (tmp_path / "p.jpg").write_bytes(encode_jpeg(item.image))
    script = BLOCKER + f"""
from fastapi.testclient import TestClient
from tasks.cli.environment import mlflow_environment
from tasks.cli.main import main
from tasks.serving.http import ServeConfig, create_app

mlflow_environment()  # what `remove` with no --model does first: reads a running stack's env file

assert main(["remove", {str(tmp_path / "p.jpg")!r}, "-o", {str(tmp_path / "out")!r}, "--model",
             {str(tmp_path / "model.onnx")!r}, "--quiet"]) == 0
assert main(["pretrained", "path", "--file", {str(tmp_path / "model.onnx")!r}]) == 0
with TestClient(create_app(ServeConfig(model={str(tmp_path / "model.onnx")!r}))) as client:
    response = client.post("/api/remove?output=mask", content=open({str(tmp_path / "p.jpg")!r}, "rb").read())
    assert response.status_code == 200, response.text
assert main(["synth", "--n", "1", "--out", {str(tmp_path / "synth")!r}]) == 2  # says which extra to install
print("loaded:", sorted(m for m in ("torch", "mlflow", "airflow") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(PROJECT), "MLFLOW_TRACKING_URI": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded: []" in done.stdout
    assert "bgremoval synth: needs pandas, which this install lacks: pip install 'bgremoval[train]'" in done.stderr
    assert (tmp_path / "out" / "p.png").exists()
