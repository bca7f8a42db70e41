"""sharedd.mountinfo's per-path questions (is something mounted here, and
what) answered without reading the mount table must agree with the table,
for plain, bind, stacked and replaced mounts (run as root, on tmpfs)."""

import os
import subprocess
import tempfile

import pytest

from sharedd import mountinfo


def sh(*argv):
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def table_says(path):
    return mountinfo.top_mounts(mountinfo.read_mountinfo()).get(os.path.realpath(path))


@pytest.fixture
def area():
    top = tempfile.mkdtemp(prefix="sharedd-mountinfo-")
    mounted = []

    def mount(*argv):
        sh("mount", *argv)
        mounted.append(argv[-1])
    try:
        yield top, mount
    finally:
        for mp in reversed(mounted):
            subprocess.run(["umount", "-l", mp], capture_output=True, timeout=60)
        subprocess.run(["rm", "-rf", "--one-file-system", top], timeout=60)


def test_questions_agree_with_the_table(area):
    top, mount = area
    a, b, c = (os.path.join(top, n) for n in "abc")
    for d in (a, b, c):
        os.mkdir(d)
    os.symlink(a, os.path.join(top, "link"))

    def check(path):
        entry = table_says(path)
        assert mountinfo.is_mounted(path) == (entry is not None), path
        got = mountinfo.mount_at(path)
        assert (got and (got.mount_id, got.fstype, got.source)) == \
            (entry and (entry.mount_id, entry.fstype, entry.source)), path

    for p in (a, b, c, os.path.join(top, "link"), os.path.join(top, "missing"), "/", "/proc"):
        check(p)
    mount("-t", "tmpfs", "-o", "size=1m", "first", a)
    check(a)
    check(os.path.join(top, "link"))            # the symlink resolves to the mount
    os.mkdir(os.path.join(a, "inner"))
    check(os.path.join(a, "inner"))              # a directory inside a mount is not one
    mount("--bind", os.path.join(a, "inner"), b)   # same file system, other place
    check(b)
    assert mountinfo.mount_at(b).fstype == "tmpfs"
    mount("-t", "tmpfs", "-o", "size=1m", "second", a)   # stacked: the top one counts
    check(a)
    assert mountinfo.mount_at(a).source == "second"
    sh("umount", a)
    sh("umount", a)
    check(a)
    assert mountinfo.mount_at(a) is None
    # a new file system where an old one was (mount ids are reused)
    mount("-t", "tmpfs", "-o", "size=1m", "third", a)
    assert mountinfo.mount_at(a).source == "third"
    sh("umount", a)
    mount("-t", "ramfs", "fourth", a)
    assert (mountinfo.mount_at(a).fstype, mountinfo.mount_at(a).source) == ("ramfs", "fourth")
    check(c)
