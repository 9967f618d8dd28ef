"""URL-addressed storage through fsspec: the same calls for ``s3://`` and local paths.

Every stage reads and writes through these helpers so it runs unchanged in Airflow, in a test
and on a Databricks cluster. ``storage_options`` is the dict fsspec passes to the filesystem
(for ``s3fs``: ``key``, ``secret``, ``client_kwargs={"endpoint_url": ...}``); the DAG layer builds
it from an Airflow connection, a test or the CLI builds it from the environment.

Writes are atomic, so a reader never sees half an object: an object store's PUT is atomic by
itself (one request); a local file is written to a temporary name next to the target, then
renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its full URL, its path relative to the listed prefix, size, ETag and when it
    was last written (``modified``, as the store gives it: a local file's mtime, an object's
    LastModified; what changes when the object is written again)."""

    url: str
    relpath: str
    size: int
    etag: str = ""
    modified: str = ""


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path-without-protocol)`` for ``url``."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    return fs, path


def absolute_local(url: str | None) -> str | None:
    """``url`` with a relative local path made absolute against the current folder; URLs
    (``s3://``, ``file://``), absolute paths and None as given. What a path names must not change
    when another process, in another folder, reads it (training workers, later commands)."""
    return url if not url or "://" in url or os.path.isabs(url) else os.path.abspath(url)


def place_key(url: str) -> str:
    """A URL or local path in the form two names of the same file or folder share: a local path (or
    ``file://`` URL) absolute and through its symbolic links, any other URL without a trailing slash."""
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    return os.path.realpath(url.removeprefix("file://"))


def is_file(url: str, storage_options: dict | None = None) -> bool:
    """True when ``url`` is a file or an object (not a folder, prefix or nothing)."""
    fs, path = filesystem(url, storage_options)
    return fs.isfile(path)


def join(base: str, *parts: str) -> str:
    """Join URL parts with ``/`` whatever the protocol (``join("s3://b/raw", "x.jpg")``)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _url_for(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path}"


def create_exclusive(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``url`` only if nothing is there; raises ``FileExistsError`` otherwise.

    S3: one ``PutObject`` with ``If-None-Match: *`` (AWS S3, MinIO and moto honour it; a store
    that ignores the header degrades to check-then-write). Local: a temporary file hard-linked
    into place, which fails atomically when the target exists.
    """
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as handle:
            handle.write(data)
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
        return
    fs.invalidate_cache(path)
    if fs.exists(path):
        raise FileExistsError(url)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        raise
    except OSError as exc:  # a 412 that s3fs did not recognise as If-None-Match (MinIO leaves Condition out)
        if exc.errno == errno.EINVAL and re.search(r"pre-?condition|\b412\b", str(exc), re.IGNORECASE):
            raise FileExistsError(url) from None
        raise


#: Errors that concern one object (it is missing, or this process may not read it): the item they
#: belong to fails with its reason and the batch goes on. Any other error while reading or writing
#: (the endpoint unreachable, a timeout, a server error) is the storage's, not the item's: it fails
#: the task, whose retry redoes the shard.
OBJECT_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def exists(url: str, storage_options: dict | None = None) -> bool:
    """True when an object (or a local file) exists at ``url``."""
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """Return the whole object at ``url``."""
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def read_many(urls: list[str], storage_options: dict | None = None) -> dict[str, bytes]:
    """Read many small objects of one store concurrently; returns ``{url: bytes}`` (missing ones
    left out)."""
    if not urls:
        return {}
    fs, _ = filesystem(urls[0], storage_options)
    paths = {filesystem(u, storage_options)[1]: u for u in urls}
    found = fs.cat(list(paths), on_error="omit")
    return {paths[p]: data for p, data in found.items() if p in paths}


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> str:
    """Write ``data`` to ``url`` atomically and return ``url``: one PUT on an object store (S3
    replaces an object whole), a temporary file renamed into place on a local disk."""
    fs, path = filesystem(url, storage_options)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return url
    _write_local_atomically(path, data)
    return url


def _write_local_atomically(path: str, data: bytes) -> None:
    """A temporary file next to ``path``, renamed over it (``os.replace`` is atomic on POSIX); plain
    system calls, because fsspec's local open, move and existence check cost three times as much
    for the small files a dataset holds."""
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
    try:
        handle = open(tmp, "wb")
    except FileNotFoundError:
        os.makedirs(parent, exist_ok=True)
        handle = open(tmp, "wb")
    try:
        with handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(url: str, text: str, storage_options: dict | None = None) -> str:
    """Write UTF-8 ``text`` to ``url`` atomically and return ``url``."""
    return write_bytes(url, text.encode("utf-8"), storage_options)


def list_objects(prefix_url: str, storage_options: dict | None = None) -> Iterator[ObjectInfo]:
    """Yield every object below ``prefix_url`` (recursively), sorted by relative path.

    Temporary keys left by an interrupted atomic write are skipped, and so are the empty keys ending in
    ``/`` that S3 consoles write for "Create folder" (folders, not objects).
    """
    fs, root = filesystem(prefix_url, storage_options)
    root = root.rstrip("/")
    found = fs.find(root, detail=True)  # {} for a prefix with nothing below it
    for path in sorted(found):
        info = found[path]
        if info.get("type") == "directory":
            continue
        rel = path[len(root):].lstrip("/")
        if posixpath.basename(rel).startswith(".tmp-") or path.endswith("/"):
            continue
        yield object_info(fs, path, rel, info)


def object_info(fs: fsspec.AbstractFileSystem, path: str, relpath: str, info: dict) -> ObjectInfo:
    """The :class:`ObjectInfo` of ``path`` from the filesystem's ``info`` of it."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
    return ObjectInfo(url=_url_for(fs, path), relpath=relpath, size=int(info.get("size") or 0), etag=etag,
                      modified=str(modified))


def list_names_after(folder_url: str, after: str = "", storage_options: dict | None = None, *,
                     page_size: int = 1000) -> list[str]:
    """The names of the objects directly in ``folder_url`` that sort after ``after``, sorted; always a
    fresh listing. On S3 the store skips the earlier ones (``ListObjectsV2`` with ``StartAfter``), so the
    cost follows what is new, not the folder's size."""
    fs, root = filesystem(folder_url, storage_options)
    root = root.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names
                      if n > after and not n.startswith(".tmp-") and os.path.isfile(os.path.join(root, n)))
    bucket, _, prefix = root.partition("/")
    prefix = f"{prefix}/" if prefix else ""
    names: list[str] = []
    request = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "StartAfter": prefix + after, "MaxKeys": page_size}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            break
        request["ContinuationToken"] = page["NextContinuationToken"]
    return sorted(n for n in names if n > after and not n.startswith(".tmp-"))


def list_folders(url: str, storage_options: dict | None = None) -> list[str]:
    """The names of the folders directly below ``url``, sorted (none when ``url`` does not exist);
    always a fresh listing (another process may have added one since)."""
    fs, root = filesystem(url, storage_options)
    try:
        entries = fs.ls(root.rstrip("/"), detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")


def forget_listings(url: str, storage_options: dict | None = None) -> None:
    """Drop this process's cached listings of ``url`` and its parents: s3fs keeps listings for the
    life of the filesystem object, and in a long-lived api-server another process (a second worker,
    the inference DAG) may have written since."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)


def remove(url: str, storage_options: dict | None = None) -> None:
    """Delete the object at ``url`` if it exists (used only on a stage's own outputs)."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path)


def ensure_bucket(url: str, storage_options: dict | None = None) -> None:
    """Create the bucket of an ``s3://`` URL when it is missing; a no-op for local paths."""
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(path, exist_ok=True)
        return
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)


#: s3fs keeps the listings it made for the life of its filesystem object; in every process (the
#: long-lived api-server, a task, the CLI's ``--watch``) they expire after this many seconds, since other
#: processes write the buckets, and at most this many paths are kept.
LISTINGS_EXPIRY_S, LISTINGS_MAX_PATHS = 30, 2000


def s3_storage_options(
    endpoint_url: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    region: str | None = None,
) -> dict:
    """Build s3fs ``storage_options`` from explicit values (``None`` values are left out), with a
    bounded, expiring listings cache."""
    options: dict = {"listings_expiry_time": LISTINGS_EXPIRY_S, "max_paths": LISTINGS_MAX_PATHS}
    if key:
        options["key"] = key
    if secret:
        options["secret"] = secret
    client_kwargs: dict = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def storage_options_from_env(environ: dict | None = None) -> dict:
    """Build s3fs ``storage_options`` from ``AWS_ENDPOINT_URL``/``AWS_ACCESS_KEY_ID``/... (CLI use)."""
    env = os.environ if environ is None else environ
    return s3_storage_options(
        endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        key=env.get("AWS_ACCESS_KEY_ID"),
        secret=env.get("AWS_SECRET_ACCESS_KEY"),
        region=env.get("AWS_DEFAULT_REGION"),
    )
