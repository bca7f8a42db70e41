"""mountd's spool reader on real files: hostile entries are refused by name."""

import json
import os
import pathlib
import threading

import pytest

from mountd.spool_reader import (SpoolFileRejected, latest_periodic, list_host_dirs,
                                 list_records, parse_file_name, read_record)
from sharedd import record as rec
from sharedd.hooks import spool
from sharedd.hooks.base import HookContext
from sharedd.hooks.spool import SpoolHook

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "schema" / "examples"
INVALID = EXAMPLES / "invalid"
EXPECTED = json.loads((INVALID / "expected.json").read_text())
VALID_FILES = sorted(p.name for p in EXAMPLES.glob("*.json"))
NOBODY = 65534
HOST = "storage1"


def golden(name):
    return json.loads((EXAMPLES / name).read_text())


@pytest.fixture
def host_dir(tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o755)
    d = spool_dir / HOST
    d.mkdir()
    os.chmod(d, 0o755)
    return d


def put(directory, name, data: bytes, mode=0o644):
    p = pathlib.Path(directory) / name
    p.write_bytes(data)
    os.chmod(p, mode)
    return str(p)


def put_record(directory, obj):
    return put(directory, rec.file_name(obj), rec.dumps(obj))


@pytest.mark.parametrize("name", VALID_FILES)
def test_golden_examples_read_back(host_dir, name):
    obj = golden(name)
    assert read_record(put_record(host_dir, obj)) == obj


def test_records_written_by_the_spool_hook_pass(tmp_path):
    sp = tmp_path / "spool"
    try:
        h = SpoolHook("main", None, HookContext(HOST, str(sp)))
        for n in VALID_FILES:
            obj = golden(n)
            (h.execute_periodic_hook if obj["phase"] == "periodic" else h.execute_pre_hook)(obj)
        files = list_records(str(sp / HOST))
        assert [f.seq for f in files] == sorted(golden(n)["seq"] for n in VALID_FILES)
        assert [read_record(f.path) for f in files] == \
            sorted((golden(n) for n in VALID_FILES), key=lambda o: o["seq"])
    finally:
        spool._SPOOLS.pop(str(sp / HOST), None)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_invalid_golden_examples_rejected(host_dir, name):
    data = (INVALID / name).read_bytes()
    path = put(host_dir, "00000000000000000041-pre-allow_access.json", data)
    with pytest.raises(SpoolFileRejected) as info:
        read_record(path)
    assert EXPECTED[name]["error"] in info.value.reason
    assert info.value.path == path


def test_symlink_refused(host_dir, tmp_path):
    target = put(tmp_path, "real.json", rec.dumps(golden("pre-allow_access.json")))
    link = host_dir / rec.file_name(golden("pre-allow_access.json"))
    os.symlink(target, link)
    with pytest.raises(SpoolFileRejected, match="symbolic link"):
        read_record(str(link))


def test_symlinked_host_dir_refused(host_dir, tmp_path):
    obj = golden("pre-allow_access.json")
    put_record(host_dir, obj)
    os.symlink(host_dir, tmp_path / "spool" / "other")
    with pytest.raises(SpoolFileRejected, match="host directory is a symbolic link"):
        read_record(str(tmp_path / "spool" / "other" / rec.file_name(obj)))
    assert list_host_dirs(str(tmp_path / "spool")) == [HOST]


def test_wrong_owner_refused(host_dir):
    obj = golden("post-allow_access.json")
    path = put_record(host_dir, obj)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(SpoolFileRejected, match=f"owned by uid {NOBODY}"):
        read_record(path)
    assert read_record(path, allowed_uids={0, NOBODY}) == obj
    assert read_record(path, allowed_uids=None) == obj


def test_host_dir_owned_by_other_or_writable_refused(host_dir):
    obj = golden("post-allow_access.json")
    path = put_record(host_dir, obj)
    os.chown(host_dir, NOBODY, NOBODY)
    with pytest.raises(SpoolFileRejected, match=f"owned by uid {NOBODY}"):
        read_record(path)
    os.chown(host_dir, 0, 0)
    os.chmod(host_dir, 0o777)
    with pytest.raises(SpoolFileRejected, match="writable by group or others"):
        read_record(path)
    os.chmod(host_dir, 0o755)
    assert read_record(path) == obj


def test_huge_file_refused_unread(host_dir):
    path = host_dir / "00000000000000000001-pre-allow_access.json"
    with open(path, "wb") as f:
        f.truncate(rec.MAX_RECORD_BYTES + 1)     # sparse: refusing must not read it
    with pytest.raises(SpoolFileRejected, match="more than"):
        read_record(str(path))


def test_padded_valid_json_over_the_limit_refused(host_dir):
    data = rec.dumps(golden("pre-allow_access.json"))
    path = put(host_dir, "00000000000000000041-pre-allow_access.json",
               data + b" " * (rec.MAX_RECORD_BYTES + 1 - len(data)))
    with pytest.raises(SpoolFileRejected, match="more than"):
        read_record(path)


def test_partial_json_refused(host_dir):
    obj = golden("periodic.json")
    data = rec.dumps(obj)
    path = put(host_dir, rec.file_name(obj), data[:len(data) // 2])
    with pytest.raises(SpoolFileRejected, match="not valid JSON"):
        read_record(path)


def test_deeply_nested_json_refused(host_dir):
    path = put(host_dir, "00000000000000000001-pre-allow_access.json", b"[" * 200000)
    with pytest.raises(SpoolFileRejected, match="nested too deeply"):
        read_record(path)


def test_not_utf8_refused(host_dir):
    path = put(host_dir, "00000000000000000001-pre-allow_access.json", b'{"a": "\xff"}')
    with pytest.raises(SpoolFileRejected, match="not valid JSON"):
        read_record(path)


def _read_in_thread(path):
    result = {}

    def run():
        try:
            read_record(path)
        except SpoolFileRejected as exc:
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    return t.is_alive(), result.get("error")


def test_fifo_refused_without_blocking(host_dir):
    path = str(host_dir / "00000000000000000001-pre-allow_access.json")
    os.mkfifo(path, 0o644)
    alive, error = _read_in_thread(path)
    if alive:                       # unblock the stuck reader, then fail
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert not alive, "read_record blocked on a FIFO"
    assert error is not None and "not a regular file" in error.reason


def test_device_node_refused(host_dir):
    path = str(host_dir / "00000000000000000001-pre-allow_access.json")
    os.mknod(path, 0o644 | 0o020000, os.makedev(1, 5))   # a /dev/zero twin
    alive, error = _read_in_thread(path)
    assert not alive and error is not None and "not a regular file" in error.reason


def test_directory_named_like_a_record_refused(host_dir):
    path = host_dir / "00000000000000000001-pre-allow_access.json"
    path.mkdir()
    with pytest.raises(SpoolFileRejected, match="not a regular file"):
        read_record(str(path))


def test_mismatched_name_refused(host_dir):
    obj = golden("pre-allow_access.json")       # seq 41
    data = rec.dumps(obj)
    for name in ("00000000000000000042-pre-allow_access.json",
                 "00000000000000000041-post-allow_access.json",
                 "00000000000000000041-pre-deny_access.json"):
        with pytest.raises(SpoolFileRejected, match="name does not match"):
            read_record(put(host_dir, name, data))


def test_record_in_another_hosts_dir_refused(host_dir):
    other = host_dir.parent / "storage2"
    other.mkdir()
    os.chmod(other, 0o755)
    path = put_record(other, golden("pre-allow_access.json"))
    with pytest.raises(SpoolFileRejected, match="record is for host 'storage1'"):
        read_record(path)


def test_bad_names_refused(host_dir, tmp_path):
    data = rec.dumps(golden("pre-allow_access.json"))
    for name in (".00000000000000000041-pre-allow_access.json.abc",
                 "41-pre-allow_access.json", "00000000000000000041-pre-allow_access.json~",
                 "00000000000000000041-pre-allow_access.json\n"):
        with pytest.raises(SpoolFileRejected, match="name is not"):
            read_record(put(host_dir, name, data))
    bad_dir = tmp_path / "spool" / "bad host"
    bad_dir.mkdir()
    with pytest.raises(SpoolFileRejected, match="not a host id"):
        read_record(put(bad_dir, "00000000000000000041-pre-allow_access.json", data))


def test_list_host_dirs(host_dir, tmp_path):
    root = tmp_path / "spool"
    for name in ("b-host", "a.host", ".hidden", "bad name", "host\n", "-dash"):
        (root / name).mkdir()
    (root / "plainfile").write_text("x")
    os.symlink(host_dir, root / "linked")
    assert list_host_dirs(str(root)) == ["a.host", "b-host", HOST]
    assert list_host_dirs(str(tmp_path / "missing")) == []


def test_list_records_in_seq_order(host_dir):
    names = ["00000000000000000010-post-allow_access.json",
             "00000000000000000002-periodic-periodic.json",
             "00000000000000000100-pre-delete_share.json",
             "00000000000000000009-periodic-periodic.json",
             "00000000000000000001-pre-allow_access.json"]
    for n in names + [".00000000000000000011-post-allow_access.json.tmp", "README",
                      "00000000000000000003-during-allow_access.json"]:
        put(host_dir, n, b"{}")
    files = list_records(str(host_dir))
    assert [f.seq for f in files] == [1, 2, 9, 10, 100]
    assert all(f.path == str(host_dir / f.name) for f in files)
    assert [f.seq for f in list_records(str(host_dir), after_seq=9)] == [10, 100]
    assert latest_periodic(files).seq == 9
    assert latest_periodic(files[:1]) is None
    assert list_records(str(host_dir / "missing")) == []
    assert parse_file_name("00000000000000000010-post-allow_access.json")[:3] == \
        (10, "post", "allow_access")
    assert parse_file_name(".00000000000000000010-post-allow_access.json") is None
