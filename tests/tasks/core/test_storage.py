"""URL storage helpers on a local folder and on a real S3 API (moto_server)."""

from __future__ import annotations

import pytest

from tasks.core import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root"), None
    bucket_url, options = request.getfixturevalue("s3_bucket")
    return bucket_url, options


def test_write_read_list_remove(root):
    base, options = root
    url = storage.join(base, "a", "b c.txt")
    storage.write_bytes(url, b"hello", options)
    storage.write_text(storage.join(base, "a", "z.txt"), "zz", options)
    assert storage.exists(url, options)
    assert storage.read_bytes(url, options) == b"hello"
    listed = list(storage.list_objects(storage.join(base, "a"), options))
    assert [o.relpath for o in listed] == ["b c.txt", "z.txt"]
    assert listed[0].size == 5
    storage.remove(url, options)
    assert not storage.exists(url, options)
    assert list(storage.list_objects(storage.join(base, "missing"), options)) == []


def test_atomic_write_leaves_no_temporary_keys(root):
    base, options = root
    for i in range(3):
        storage.write_bytes(storage.join(base, "x", f"{i}.bin"), bytes([i]) * 10, options)
    fs, path = storage.filesystem(storage.join(base, "x"), options)
    names = [p.rsplit("/", 1)[-1] for p in fs.find(path)]
    assert sorted(names) == ["0.bin", "1.bin", "2.bin"]


def test_local_write_replaces_a_file_whole_and_cleans_up_when_it_fails(tmp_path):
    target = tmp_path / "deep" / "er" / "a.png"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(str(target), b"second, longer")
    assert target.read_bytes() == b"second, longer"
    blocked = tmp_path / "folder"
    (blocked / "inside").mkdir(parents=True)  # a directory in the way: the rename fails
    with pytest.raises(OSError):
        storage.write_bytes(str(blocked), b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "folder"]  # no temporary file left


def test_listing_skips_interrupted_temporary_writes(tmp_path):
    (tmp_path / ".tmp-1234-a.jpg").write_bytes(b"half")
    (tmp_path / "a.jpg").write_bytes(b"whole")
    assert [o.relpath for o in storage.list_objects(str(tmp_path))] == ["a.jpg"]


def test_join_and_options():
    assert storage.join("s3://b/", "/raw/", "x.jpg") == "s3://b/raw/x.jpg"
    options = storage.storage_options_from_env(
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    )
    assert options == {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                       "listings_expiry_time": storage.LISTINGS_EXPIRY_S, "max_paths": storage.LISTINGS_MAX_PATHS}


def test_every_s3_filesystem_keeps_a_bounded_expiring_listings_cache():
    from s3fs import S3FileSystem

    options = storage.s3_storage_options(endpoint_url="http://127.0.0.1:9")
    cache = S3FileSystem(anon=True, skip_instance_cache=True, **options).dircache
    assert (cache.listings_expiry_time, cache.max_paths) == (30, 2000)


def test_list_folders_names_the_folders_directly_below(root):
    base, options = root
    for key in ("t/v2/run/report.html", "t/v1/x.txt", "t/v10/a/b.txt", "t/file.txt"):
        storage.write_bytes(storage.join(base, key), b"x", options)
    assert storage.list_folders(storage.join(base, "t"), options) == ["v1", "v10", "v2"]
    assert storage.list_folders(storage.join(base, "missing"), options) == []


def test_list_folders_sees_a_folder_another_client_added(root):
    base, options = root
    storage.write_bytes(storage.join(base, "u", "v1", "x"), b"x", options)
    assert storage.list_folders(storage.join(base, "u"), options) == ["v1"]
    other = {**options, "default_block_size": 6 * 2**20} if options else None  # another s3fs client: another process
    storage.write_bytes(storage.join(base, "u", "v2", "x"), b"x", other)
    assert storage.list_folders(storage.join(base, "u"), options) == ["v1", "v2"]


def test_names_after_a_name_list_only_the_later_objects_of_the_folder(root):
    base, options = root
    folder = storage.join(base, "log")
    assert storage.list_names_after(folder, "", options) == []
    for name in ("003.json", "001.json", "002.json", "sub/004.json"):
        storage.write_bytes(storage.join(folder, name), b"{}", options)
    assert storage.list_names_after(folder, "", options) == ["001.json", "002.json", "003.json"]
    assert storage.list_names_after(folder, "001.json", options) == ["002.json", "003.json"]
    assert storage.list_names_after(folder, "003.json", options) == []
    assert storage.list_names_after(folder, "", options, page_size=2) == ["001.json", "002.json", "003.json"]


def test_absolute_local_and_is_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute_local("data/x") == str(tmp_path / "data" / "x")
    assert [storage.absolute_local(u) for u in ("s3://b/x", "/srv/x", None, "")] == ["s3://b/x", "/srv/x", None, ""]
    (tmp_path / "f").write_bytes(b"1")
    assert storage.is_file(str(tmp_path / "f")) and not storage.is_file(str(tmp_path))
    assert not storage.is_file(str(tmp_path / "nothing"))


def test_listing_skips_the_folder_markers_a_console_writes(s3_bucket):
    """The AWS console's "Create folder" writes an empty key ending in '/': a folder, not an object."""
    import boto3

    bucket_url, options = s3_bucket
    storage.write_bytes(storage.join(bucket_url, "m", "images", "p.jpg"), b"x", options)
    client = boto3.client("s3", aws_access_key_id=options["key"], aws_secret_access_key=options["secret"],
                          **options["client_kwargs"])
    bucket = bucket_url.removeprefix("s3://").split("/", 1)[0]
    prefix = bucket_url.removeprefix(f"s3://{bucket}").strip("/")
    for marker in ("m/images/", "m/masks/", "m/"):
        client.put_object(Bucket=bucket, Key="/".join(filter(None, [prefix, marker])).rstrip("/") + "/", Body=b"")
    storage.filesystem(bucket_url, options)[0].invalidate_cache()
    assert [o.relpath for o in storage.list_objects(storage.join(bucket_url, "m"), options)] == ["images/p.jpg"]
