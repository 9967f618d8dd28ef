"""The awkward drop (``tasks.dev.awkward``: a real 256-megapixel PNG bomb, a 144-megapixel header,
empty and text files, truncated, CMYK, 16-bit, alpha, WebP, corrupt and rotating EXIF, a sliver)
through the ``bgremoval_inference`` DAG itself (``airflow dags test``, moto S3): the run completes, the
convertible photos come out, the refused ones are in ``failed/`` with their reasons, and the inputs
are untouched. The peak RSS of the whole ``airflow dags test`` process is printed (``pytest -s``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core import storage
from tasks.dev.awkward import CONVERTIBLE, REFUSED, awkward_drop
from tasks.feedback.queue import list_queue

pytestmark = pytest.mark.integration
AIRFLOW = str(Path(sys.executable).parent / "airflow")
#: Runs ``argv[2:]`` and writes its peak RSS in KiB to ``argv[1]``. The measured process is the
#: child of this small interpreter, not of pytest: a child's ``ru_maxrss`` is at least its parent's
#: peak until the ``exec`` (the kernel carries it over), which from pytest would be pytest's.
PEAK_RSS_OF = (
    "import os, subprocess, sys\n"
    "process = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(process.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def test_an_awkward_drop_completes_through_the_inference_dag(airflow_db, s3_bucket, write_model_folder, tmp_path,
                                                            capsys):
    bucket_url, options = s3_bucket
    bucket = bucket_url.removeprefix("s3://")
    drop = awkward_drop()
    for name, data in drop.items():
        storage.write_bytes(f"{bucket_url}/incoming/awkward-1/{name}", data, options)
    storage.write_bytes(f"{bucket_url}/incoming/awkward-1/_READY", b"", options)
    model = write_model_folder(tmp_path / "model")
    conf = {"batch": "awkward-1", "bucket": bucket, "model_uri": model, "quality_threshold": 0.01,
            "photos_per_shard": 5}
    log, peak = tmp_path / "inference.log", tmp_path / "peak-rss-kib"
    with open(log, "wb") as out:
        process = subprocess.run([sys.executable, "-c", PEAK_RSS_OF, str(peak), AIRFLOW, "dags", "test",
                                  "bgremoval_inference", "--conf", json.dumps(conf)],
                                 stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ), check=False)
    assert process.returncode == 0, log.read_text()[-5000:]
    with capsys.disabled():
        print(f"\nawkward drop through bgremoval_inference: peak RSS of `airflow dags test` "
              f"{int(peak.read_text()) / 1024:.0f} MiB (Airflow, the tasks and the model in one process)")

    failed = {entry["stem"]: entry["reason"]
              for o in storage.list_objects(f"{bucket_url}/production/awkward-1/failed", options)
              for entry in json.loads(storage.read_bytes(o.url, options))}
    assert set(REFUSED) <= set(failed), failed
    assert "too large" in failed["bomb256"] and "too large" in failed["bomb"]
    assert "empty" in failed["zero"] and "not an image" in failed["text"]
    assert all(reason for reason in failed.values())
    published = {o.relpath for o in storage.list_objects(f"{bucket_url}/published/awkward-1", options)}
    queued = {q["stem"] for q in list_queue(bucket_url, options) if q["batch"] == "awkward-1"}
    for stem in CONVERTIBLE:
        assert stem not in failed and (f"{stem}.png" in published or stem in queued), (stem, failed.get(stem))
    for name, data in drop.items():  # inputs are never touched
        assert storage.read_bytes(f"{bucket_url}/incoming/awkward-1/{name}", options) == data
