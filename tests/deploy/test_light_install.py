"""The core install: ``pip install <checkout>`` without extras brings neither Airflow nor torch,
and ``bgremoval remove`` and ``bgremoval serve`` work in that environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tasks.dev import stack
from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
from tasks.model.export import export_onnx
from tasks.model.u2net import U2Net
from tasks.train.config import TrainConfig

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory, project_wheel, uv) -> tuple[Path, dict[str, str]]:
    """A fresh venv with the wheel installed without extras; ``(venv, environment for its processes)``."""
    tool, env = uv
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([tool, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=env)
    done = subprocess.run([tool, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "-c",
                           str(ROOT / "constraints.txt"), str(project_wheel)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv, env


def test_the_core_install_cuts_out_without_airflow_or_torch(light_venv, tmp_path):
    light_venv, env = light_venv
    python = str(light_venv / "bin" / "python")
    missing = subprocess.run([python, "-c", "import importlib.util as u; "
                              "print([m for m in ('torch', 'airflow', 'mlflow', 'pandas') if u.find_spec(m)])"],
                             capture_output=True, text=True, cwd=tmp_path, env=env)
    assert missing.stdout.strip() == "[]", missing.stdout + missing.stderr
    config = TrainConfig(dataset_url="-", output_url="-", model_widths={"encoder": [[4, 8]] * 6,
                                                                        "decoder": [[4, 8]] * 5})
    torch.manual_seed(0)
    export_onnx(U2Net(config.model_config()).eval(), str(tmp_path / "model.onnx"), 32, model_name="u2netp")
    photo = render_item(0, SynthConfig(n=1, seed=2, max_side=96)).image
    (tmp_path / "p.jpg").write_bytes(encode_jpeg(photo))
    cli = str(light_venv / "bin" / "bgremoval")
    done = subprocess.run([cli, "remove", str(tmp_path / "p.jpg"), "-o", str(tmp_path / "out"), "--model",
                           str(tmp_path / "model.onnx"), "--quiet"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "p.png").exists() and (tmp_path / "out" / "p.jpg").exists()

    port = stack.free_port()
    server = subprocess.Popen([cli, "serve", "--model", str(tmp_path / "model.onnx"), "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        stack.wait_http(f"http://127.0.0.1:{port}/readyz", 120, server, status=200)
        response = httpx.post(f"http://127.0.0.1:{port}/api/remove", content=(tmp_path / "p.jpg").read_bytes(),
                              timeout=60)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    finally:
        server.terminate()
        server.wait(30)
