"""Checkpoints and weights on storage: atomic writes, safe loads, RNG states, state hashes.

A checkpoint is a plain dict saved with ``torch.save``; everything in it (tensors, numbers,
strings, lists, dicts, tuples) loads with ``torch.load(weights_only=True)``, so reading one never
runs pickled code. Writes go through :func:`tasks.core.storage.write_bytes` (atomic: one PUT on
S3, a renamed temporary file on disk): a crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tasks.core import storage
from tasks.model.io import load_state_dict_from_url

__all__ = [
    "capture_rng_state",
    "load_checkpoint",
    "load_state_dict_from_url",
    "restore_rng_state",
    "save_checkpoint",
    "state_dict_sha256",
]


def capture_rng_state() -> dict[str, Any]:
    """Return this process's Python, NumPy, torch (and CUDA) RNG states as a weights-only-safe dict."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state` (CUDA only where available)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(url: str, checkpoint: Mapping[str, Any], storage_options: dict | None = None) -> str:
    """Serialise ``checkpoint`` with ``torch.save`` and write it to ``url`` atomically; returns ``url``."""
    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    return storage.write_bytes(url, buffer.getvalue(), storage_options)


def load_checkpoint(url: str, storage_options: dict | None = None) -> dict[str, Any] | None:
    """Return the checkpoint dict at ``url`` (tensors on the CPU), or None when there is none.

    Raises ``ValueError`` naming the URL when the file exists but cannot be read as a checkpoint.
    """
    if not storage.exists(url, storage_options):
        return None
    data = storage.read_bytes(url, storage_options)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ValueError(f"cannot read the checkpoint at {url} ({exc}); delete it to start the run afresh "
                         "or point output_url elsewhere") from exc
    if not isinstance(loaded, dict) or "model" not in loaded or "epoch" not in loaded:
        raise ValueError(f"{url} is not a training checkpoint (no 'model'/'epoch' entries)")
    return loaded


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Return a SHA-256 over the names, dtypes, shapes and bytes of every tensor in ``state_dict``
    (sorted by name): equal hashes mean bit-identical weights and buffers."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
