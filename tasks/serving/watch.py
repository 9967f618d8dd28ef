"""``bgremoval remove --watch``: cut out photos as they arrive in a folder or prefix.

Polling rather than file-system events, so that the same loop serves local folders, network
mounts and ``s3://`` prefixes. A photo is taken once its listing (size, ETag, time written) has
stayed the same over two polls (a file still being copied is not read half-written), and taken
again only when it is written again (a re-shoot under the same name, or a copy that stalled and
was finished); photos whose outputs already exist when a watch starts are skipped, so a restarted
watch resumes where it stopped, and its ``results.jsonl`` goes on from the earlier watch's lines.
Inputs are only read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tasks.core import storage
from tasks.serving.engines import Engine
from tasks.serving.pipeline import (
    RESULTS_FILE,
    InferenceConfig,
    earlier_lines,
    iter_remove_backgrounds,
    left_out_line,
    list_inputs,
    mark_output_folder,
    options_for,
    path_key,
    planned_outputs,
    results_line,
    save_result,
    without_output_clashes,
    written_by,
)

__all__ = ["WatchState", "poll_once", "watch"]


#: A photo's listing as :class:`tasks.serving.pipeline.InputListing` gives it: ``(size, ETag, modified)``.
Version = tuple[int, str, str]


@dataclass
class WatchState:
    """What a watch has done so far: images cut out, images failed, the results lines, each photo's
    version when it was taken (``done``) and when last seen (``seen``), what it has said it leaves out
    (said once) and the files written into the output folder."""

    ok: int = 0
    failed: int = 0
    lines: list[str] = field(default_factory=list)
    done: dict[str, Version] = field(default_factory=dict)
    seen: dict[str, Version] = field(default_factory=dict)
    left_out: set[str] = field(default_factory=set)
    #: The files written into the output folder, by this watch and the runs before it (:func:`written_by`).
    written: set[str] = field(default_factory=set)


def _has_outputs(stem: str, out_url: str, config: InferenceConfig, storage_options: dict | None) -> bool:
    options = options_for(out_url, storage_options)
    return all(storage.exists(url, options) for url in planned_outputs(stem, out_url, config))


def poll_once(inputs: Sequence[str], out_url: str, engine: Engine, config: InferenceConfig, state: WatchState,
              storage_options: dict | None = None, log: Callable[[str], None] = print,
              threshold: float | None = None) -> int:
    """One round of :func:`watch`: cut out every photo that has become ready since the last round.
    Returns how many were taken. The output location is left out of the inputs, and no output is
    written over a photo of the inputs."""
    listing = list_inputs(inputs, storage_options, exclude=out_url, skip_earlier_outputs=True,
                          written=state.written or None)  # none yet: results.jsonl says what earlier runs wrote
    for url, stem in listing.items:  # cut out before this watch started: taken as done, and first in clashes
        if url not in state.seen and url not in state.done and _has_outputs(stem, out_url, config, storage_options):
            state.done[url] = state.seen[url] = listing.versions[url]
    items, clashes = without_output_clashes(listing.items, out_url, config, first=state.done)
    said = [left_out_line(folder) for folder in listing.earlier_outputs]
    for line in [*said, *(f"skipped: {problem}" for problem in [*listing.problems, *clashes])]:
        if line not in state.left_out:  # said once per watch
            log(line)
            state.left_out.add(line)
    ready = []
    for url, stem in items:
        version = listing.versions.get(url)
        if version is None or state.done.get(url) == version:
            continue
        if version[0] and state.seen.get(url) == version:
            ready.append((url, stem))
        state.seen[url] = version
    for result in iter_remove_backgrounds(ready, engine, config, storage_options):
        written = save_result(result, out_url, config, storage_options, protected=listing.listed)
        state.written.update(path_key(url) for url in written.values())
        state.done[result.source_url] = state.seen[result.source_url]
        if result.ok:
            state.ok += 1
            log(f"done: {result.source_url} (quality score {result.score:.3f})")
        else:
            state.failed += 1
            log(f"failed: {result.source_url}: {result.error}")
        state.lines.append(results_line(result, written, threshold, engine.source))
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
    if not state.lines:
        state.lines = earlier_lines(out_url, storage_options)
        state.written = written_by(state.lines)
    mark_output_folder(out_url, storage_options)
    while not stop.is_set():
        poll_once(inputs, out_url, engine, config, state, storage_options, log, threshold)
        stop.wait(interval)
    return state
