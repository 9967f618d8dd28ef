"""``tasks.serving.watch``: photos arriving in a folder are cut out once, after they are fully
written; a restarted watch skips what is done; ``bgremoval remove --watch`` stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
from tasks.serving.engines import load_engine
from tasks.serving.pipeline import InferenceConfig
from tasks.serving.watch import WatchState, poll_once, watch

PROJECT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def model_dir(write_model_folder, tmp_path_factory) -> str:
    return write_model_folder(tmp_path_factory.mktemp("watch-model"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return load_engine(model_dir)


def _photo(seed: int = 0) -> np.ndarray:
    """A generated product photo, RGB."""
    return render_item(seed, SynthConfig(n=4, seed=seed, max_side=120)).image


def _jpeg(image: np.ndarray) -> bytes:
    return encode_jpeg(image)


def test_a_photo_is_taken_once_after_its_size_settles(engine, tmp_path):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    (incoming / "a.jpg").write_bytes(_jpeg(_photo()))
    state, lines = WatchState(), []
    assert poll_once([str(incoming)], str(out), engine, InferenceConfig(), state, log=lines.append) == 0
    assert poll_once([str(incoming)], str(out), engine, InferenceConfig(), state, log=lines.append) == 1
    assert (out / "a.png").exists() and (out / "a.jpg").exists()
    assert poll_once([str(incoming)], str(out), engine, InferenceConfig(), state, log=lines.append) == 0
    (incoming / "b.jpg").write_bytes(b"\xff\xd8 still being copied")  # grows between polls: not taken yet
    poll_once([str(incoming)], str(out), engine, InferenceConfig(), state, log=lines.append)
    (incoming / "b.jpg").write_bytes(_jpeg(_photo(seed=2)))
    assert poll_once([str(incoming)], str(out), engine, InferenceConfig(), state, log=lines.append) == 0
    assert poll_once([str(incoming)], str(out), engine, InferenceConfig(), state, log=lines.append) == 1
    assert (state.ok, state.failed) == (2, 0)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(r["source_url"]).name for r in results] == ["a.jpg", "b.jpg"]
    restarted = WatchState()  # a new watch skips photos whose outputs exist
    poll_once([str(incoming)], str(out), engine, InferenceConfig(), restarted, log=lines.append)
    assert poll_once([str(incoming)], str(out), engine, InferenceConfig(), restarted, log=lines.append) == 0


def test_an_output_folder_inside_the_hot_folder_is_not_watched(engine, tmp_path):
    incoming = tmp_path / "hot"
    incoming.mkdir()
    (incoming / "a.jpg").write_bytes(_jpeg(_photo()))
    state = WatchState()
    for _ in range(4):
        poll_once([str(incoming)], str(incoming / "out"), engine, InferenceConfig(), state, log=lambda line: None)
    assert (state.ok, state.failed) == (1, 0)
    assert sorted(p.name for p in (incoming / "out").iterdir()) == ["a.jpg", "a.png", "results.jsonl"]


def test_watch_runs_until_stopped(engine, tmp_path):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    stop = threading.Event()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(state=watch(
        [str(incoming)], str(out), engine, InferenceConfig(mask=True), interval=0.05, stop=stop,
        log=lambda line: None)))
    thread.start()
    cv2.imwrite(str(incoming / "c.png"), cv2.cvtColor(_photo(), cv2.COLOR_RGB2BGR))
    deadline = time.monotonic() + 20
    while not (out / "masks" / "c.png").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and result["state"].ok == 1
    assert cv2.imread(str(out / "masks" / "c.png"), cv2.IMREAD_GRAYSCALE).shape == _photo().shape[:2]


@pytest.mark.process
def test_cli_watch_stops_on_sigterm(model_dir, tmp_path):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "remove", str(incoming), "-o", str(out), "--model",
                             model_dir, "--watch", "--interval", "0.2", "--quiet"], cwd=PROJECT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (incoming / "d.jpg").write_bytes(_jpeg(_photo()))
        deadline = time.monotonic() + 60
        while not (out / "d.png").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (out / "d.png").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "stopped: 1 images done, 0 failed" in stdout
    assert np.asarray(cv2.imread(str(out / "d.png"), cv2.IMREAD_UNCHANGED)).shape[2] == 4


def test_a_photo_written_again_is_cut_out_again_and_a_restart_keeps_the_log(engine, tmp_path):
    """A re-shoot under the same name, and a copy that stalled (read half-written, failed) and was then
    finished, are taken again; a restarted watch's results.jsonl goes on from the earlier lines."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    (incoming / "a.jpg").write_bytes(_jpeg(_photo()))
    whole = _jpeg(_photo(seed=5))
    (incoming / "c.jpg").write_bytes(whole[:300])  # a copy that stalls past two polls
    state, said = WatchState(), []

    def poll() -> int:
        return poll_once([str(incoming)], str(out), engine, InferenceConfig(), state, log=said.append)

    poll()
    assert poll() == 2 and (state.ok, state.failed) == (1, 1)
    first = (out / "a.png").read_bytes()
    (incoming / "a.jpg").write_bytes(_jpeg(_photo(seed=9)))  # the re-shoot
    (incoming / "c.jpg").write_bytes(whole)  # the copy finishes
    os.utime(incoming / "a.jpg", (time.time() + 5, time.time() + 5))  # written again, whatever the clock's grain
    poll()
    assert poll() == 2 and (state.ok, state.failed) == (3, 1)
    assert (out / "a.png").read_bytes() != first and (out / "c.png").exists()
    assert poll() == 0
    restarted = watch([str(incoming)], str(out), engine, InferenceConfig(), interval=0.01,
                      stop=_stopping_after(0.3), log=said.append)
    assert restarted.ok == 0 and len(restarted.lines) == 4
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def _stopping_after(seconds: float) -> threading.Event:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return stop


def test_a_watch_keeps_what_it_cut_out_first_and_never_replaces_someones_photo(engine, tmp_path):
    """masks/a.jpg arrives and is cut out to out/masks/a.png; a.jpg, arriving later, would write its mask
    there: it is the one left out, whatever the names' order. A photo someone put in the output folder
    inside the hot folder is never replaced, on the first watch or a later one."""
    incoming = tmp_path / "in"
    (incoming / "masks").mkdir(parents=True)
    (incoming / "out").mkdir()
    theirs = _jpeg(_photo(seed=7))
    (incoming / "out" / "b.jpg").write_bytes(theirs)
    (incoming / "masks" / "a.jpg").write_bytes(_jpeg(_photo(seed=1)))
    (incoming / "b.jpg").write_bytes(_jpeg(_photo(seed=2)))
    said: list[str] = []
    for _ in range(2):
        watch([str(incoming)], str(incoming / "out"), engine, InferenceConfig(mask=True), interval=0.01,
              stop=_stopping_after(0.6), log=said.append)
        (incoming / "a.jpg").write_bytes(_jpeg(_photo(seed=3)))
    out = incoming / "out"
    assert cv2.imread(str(out / "masks" / "a.png"), cv2.IMREAD_UNCHANGED).shape[2] == 4  # still masks/a.jpg's cut-out
    assert any("a.jpg: left out, its output" in line for line in said)
    assert (out / "b.jpg").read_bytes() == theirs and any("b.jpg" in line and "overwrite the input" in line for line in said)
