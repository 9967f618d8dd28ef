"""``bgremoval serve``: a real uvicorn server on loopback — outputs, caps, the concurrency limit,
readiness, a small load test without memory growth, and the model swapped when its alias moves."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tasks import registry
from tasks.dev import stack
from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
from tasks.serving.engines import Engine
from tasks.serving.http import ModelHolder, ServeConfig, create_app
from tasks.serving.mlflow_model import pyfunc_model

pytestmark = pytest.mark.process


class Server:
    """``create_app`` under uvicorn in a thread, on a free loopback port."""

    def __init__(self, config: ServeConfig, holder: ModelHolder | None = None) -> None:
        import uvicorn

        port = stack.free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config, holder), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        stack.wait_http(f"{self.url}/readyz", 60, status=200)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _photo_bytes(i: int = 0) -> tuple[bytes, tuple[int, int]]:
    image = render_item(i, SynthConfig(n=4, seed=3, max_side=160)).image
    return encode_jpeg(image), (image.shape[1], image.shape[0])


def _open(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.fixture(scope="module")
def model_dir(write_model_folder, tmp_path_factory) -> str:
    return write_model_folder(tmp_path_factory.mktemp("serve-model"))


def test_outputs_caps_and_readiness(model_dir):
    data, size = _photo_bytes()
    with Server(ServeConfig(model=model_dir, max_bytes=200_000, max_pixels=20_000)) as url:
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert "torch" in httpx.get(f"{url}/readyz").json()["model"]
        cut = httpx.post(f"{url}/api/remove", content=data, headers={"content-type": "image/jpeg"})
        assert cut.status_code == 200 and cut.headers["content-type"] == "image/png"
        assert 0 <= float(cut.headers["x-quality-score"]) <= 1
        assert (_open(cut.content).mode, _open(cut.content).size) == ("RGBA", size)
        mask = httpx.post(f"{url}/api/remove?output=mask", files={"file": ("p.jpg", data, "image/jpeg")})
        assert mask.status_code == 200 and (_open(mask.content).mode, _open(mask.content).size) == ("L", size)
        raw = httpx.post(f"{url}/api/remove?output=mask&refine=false", content=data)  # bgremoval remove --no-refine
        assert raw.status_code == 200 and (_open(raw.content).mode, _open(raw.content).size) == ("L", size)
        off = httpx.post(f"{url}/api/remove?output=mask&refine=OFF", content=data)
        on = httpx.post(f"{url}/api/remove?output=mask&refine=on", content=data)
        assert off.content == raw.content and on.content == mask.content  # auto, with no measured choice: on
        assert httpx.post(f"{url}/api/remove?refine=sometimes", content=data).status_code == 422
        jpeg = httpx.post(f"{url}/api/remove?output=jpeg&background=%23336699&decontaminate=true", content=data)
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        assert _open(jpeg.content).mode == "RGB"
        assert httpx.post(f"{url}/api/remove", content=b"x" * 300_000).status_code == 413  # body cap
        big = Image.new("RGB", (200, 200), "white")  # 40,000 pixels, over the 20,000 cap
        buffer = io.BytesIO()
        big.save(buffer, "PNG")
        too_many = httpx.post(f"{url}/api/remove", content=buffer.getvalue())
        assert too_many.status_code == 413 and "too large" in too_many.json()["detail"]
        assert httpx.post(f"{url}/api/remove", content=b"not an image").status_code == 422
        assert httpx.post(f"{url}/api/remove", content=b"").status_code == 422
        assert httpx.post(f"{url}/api/remove?output=gif", content=data).status_code == 422
        assert httpx.post(f"{url}/api/remove", files={"other": ("p.jpg", data)}).status_code == 422


class _SlowEngine(Engine):
    backend, input_size, resize = "fake", 32, "stretch"
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def predict(self, batch):
        time.sleep(1.0)
        return np.full((len(batch), 32, 32), 0.9, np.float32), None


def test_requests_beyond_the_concurrency_wait_then_get_503():
    holder = ModelHolder(ServeConfig(model="unused"))
    holder.engine = _SlowEngine()
    data, _ = _photo_bytes()
    with Server(ServeConfig(model="unused", concurrency=1, queue_timeout=0.3), holder) as url:
        with ThreadPoolExecutor(3) as pool:
            codes = sorted(pool.map(lambda _: httpx.post(f"{url}/api/remove", content=data, timeout=30).status_code,
                                    range(3)))
    assert codes[0] == 200 and 503 in codes


def test_requests_past_those_in_hand_get_503_before_their_body_is_read():
    """With one slot and one waiting place, a third request at once is answered 503 at once (its body,
    up to max_bytes, is never held), while the second waits its turn."""
    holder = ModelHolder(ServeConfig(model="unused"))
    holder.engine = _SlowEngine()
    data, _ = _photo_bytes()
    with Server(ServeConfig(model="unused", concurrency=1, max_waiting=1, queue_timeout=10), holder) as url:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{url}/api/remove", content=data, timeout=30), range(3)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 503], codes
    busy = next(a for a in answers if a.status_code == 503)
    assert "2 requests in hand" in busy.json()["detail"] and busy.elapsed.total_seconds() < 0.9
    with pytest.raises(ValueError, match="max_waiting"):
        ServeConfig(max_waiting=-1)


def _rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_load_on_loopback_without_errors_or_memory_growth(model_dir):
    photos = [_photo_bytes(i)[0] for i in range(4)]
    with Server(ServeConfig(model=model_dir, concurrency=2)) as url:
        with httpx.Client() as client:
            def one(i: int) -> tuple[int, float]:
                start = time.perf_counter()
                return client.post(f"{url}/api/remove", content=photos[i % 4]).status_code, time.perf_counter() - start

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(one, range(16)))  # warm-up: allocator pools, thread pools
                before = _rss_kb()
                results = list(pool.map(one, range(80)))
                after = _rss_kb()
    assert all(code == 200 for code, _ in results)
    latencies = sorted(t for _, t in results)
    assert latencies[len(latencies) // 2] < 5
    assert after - before < 50_000, f"RSS grew {after - before} kB over 80 requests"


def test_the_model_is_swapped_when_its_alias_moves(tmp_path, private_mlflow, write_model_folder):
    with private_mlflow(tmp_path, "serve") as run_id:
        for seed in (0, 1):
            registry.register_model(write_model_folder(tmp_path / f"run{seed}", seed=seed), "served", run_id=run_id,
                                    pyfunc_model=pyfunc_model())
        registry.promote("served", "1")
        holder = ModelHolder(ServeConfig(model="models:/served@champion"))
        holder.load()
        assert holder.version == "1" and not holder.reload_if_moved()
        first = holder.engine
        registry.promote("served", "2")
        assert holder.reload_if_moved() and holder.version == "2" and holder.engine is not first
        # an alias moved to a version that cannot be loaded: the service keeps the one it has
        import mlflow

        mlflow.MlflowClient().create_model_version("served", str(tmp_path / "empty"), run_id=run_id)
        mlflow.MlflowClient().set_registered_model_alias("served", "champion", "3")
        second = holder.engine
        assert not holder.reload_if_moved() and holder.version == "2" and holder.engine is second
        loads = []  # the next poll does not download it again
        holder.load = lambda: loads.append(1)
        assert not holder.reload_if_moved() and loads == []
