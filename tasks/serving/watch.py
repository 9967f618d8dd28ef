"""``bgremoval remove --watch``: cut out photos as they arrive in a folder or prefix.

Polling rather than file-system events, so that the same loop serves local folders, network
mounts and ``s3://`` prefixes. A photo is taken once its size has stayed the same over two polls
(a file still being copied is not read half-written) and is never taken twice; photos whose
outputs already exist are skipped, so a restarted watch resumes where it stopped. Inputs are only
read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tasks.core import storage
from tasks.serving.engines import Engine
from tasks.serving.pipeline import (
    OUTPUT_KINDS,
    RESULTS_FILE,
    InferenceConfig,
    iter_remove_backgrounds,
    left_out_line,
    list_inputs,
    mask_dir_for,
    options_for,
    output_urls,
    results_line,
    save_result,
)

__all__ = ["WatchState", "watch"]


@dataclass
class WatchState:
    """What a watch has done so far: images cut out, images failed, their results lines, and the
    earlier output folders it has said it leaves out."""

    ok: int = 0
    failed: int = 0
    lines: list[str] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    sizes: dict[str, int] = field(default_factory=dict)
    left_out: set[str] = field(default_factory=set)


def _size(url: str, storage_options: dict | None) -> int | None:
    fs, path = storage.filesystem(url, options_for(url, storage_options))
    try:
        return int(fs.size(path))
    except (OSError, FileNotFoundError):
        return None


def _has_outputs(stem: str, out_url: str, config: InferenceConfig, storage_options: dict | None) -> bool:
    urls = output_urls(stem, out_url, mask_dir_for(config))
    options = options_for(out_url, storage_options)
    return all(storage.exists(urls[kind.field], options) for kind in OUTPUT_KINDS.values() if getattr(config, kind.flag))


def poll_once(inputs: Sequence[str], out_url: str, engine: Engine, config: InferenceConfig, state: WatchState,
              storage_options: dict | None = None, log: Callable[[str], None] = print,
              threshold: float | None = None) -> int:
    """One round of :func:`watch`: cut out every photo that has become ready since the last round.
    Returns how many were taken. The output location is left out of the inputs, and no output is
    written over a photo of the inputs."""
    listing = list_inputs(inputs, storage_options, exclude=out_url, skip_earlier_outputs=True)
    for folder in set(listing.earlier_outputs) - state.left_out:  # said once per watch
        log(left_out_line(folder))
        state.left_out.add(folder)
    ready = []
    for url, stem in listing.items:
        if url in state.done:
            continue
        if url not in state.sizes and _has_outputs(stem, out_url, config, storage_options):
            state.done.add(url)  # cut out before this watch started
            continue
        size = _size(url, storage_options)
        if size and state.sizes.get(url) == size:
            ready.append((url, stem))
        if size is not None:
            state.sizes[url] = size
    for result in iter_remove_backgrounds(ready, engine, config, storage_options):
        written = save_result(result, out_url, config, storage_options, protected=listing.listed)
        state.done.add(result.source_url)
        if result.ok:
            state.ok += 1
            log(f"done: {result.source_url} (quality score {result.score:.3f})")
        else:
            state.failed += 1
            log(f"failed: {result.source_url}: {result.error}")
        state.lines.append(results_line(result, written, threshold))
    if ready:
        storage.write_text(storage.join(out_url, RESULTS_FILE), "\n".join(state.lines) + "\n",
                           options_for(out_url, storage_options))
    return len(ready)


def watch(inputs: Sequence[str], out_url: str, engine: Engine, config: InferenceConfig = InferenceConfig(),
          storage_options: dict | None = None, interval: float = 2.0, stop: threading.Event | None = None,
          log: Callable[[str], None] = print, state: WatchState | None = None,
          threshold: float | None = None) -> WatchState:
    """Poll ``inputs`` every ``interval`` seconds and cut out each new photo into ``out_url`` (as
    :func:`tasks.serving.pipeline.remove_to` does, ``results.jsonl`` with ``below_threshold`` under
    a ``threshold`` included) until ``stop`` is set (or forever). Returns the :class:`WatchState`
    (``state`` when given, so a caller still has the counts after a ``KeyboardInterrupt``)."""
    stop = stop or threading.Event()
    state = state if state is not None else WatchState()
    while not stop.is_set():
        poll_once(inputs, out_url, engine, config, state, storage_options, log, threshold)
        stop.wait(interval)
    return state
