"""How ``bgremoval serve`` runs, apart from the server (which needs FastAPI), so that the command line
reads its defaults without importing it."""

from __future__ import annotations

from dataclasses import dataclass

from tasks.core.limits import MAX_PIXELS


@dataclass(frozen=True)
class ServeConfig:
    """How ``bgremoval serve`` runs: the model (anything :func:`tasks.serving.engines.load_engine` takes), its ONNX
    Runtime threads and sessions, the body and pixel caps, the number of images in the model at
    once, how many more may wait for a slot (``max_waiting``: past it a request is answered 503
    before its body is read, so bodies held in memory stay under ``(concurrency + max_waiting) ×
    max_bytes``), how long a request may wait, and how often a ``models:/`` alias is re-read (0: never)."""

    model: str = "pretrained"
    threads: int | None = None
    sessions: int = 1
    max_bytes: int = 20 * 2**20
    max_pixels: int = MAX_PIXELS
    concurrency: int = 2
    max_waiting: int = 8
    queue_timeout: float = 30.0
    reload_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or self.concurrency < 1 or self.queue_timeout <= 0:
            raise ValueError("max_bytes, max_pixels and concurrency must be >= 1 and queue_timeout > 0")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
