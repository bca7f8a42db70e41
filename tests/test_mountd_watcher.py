"""mountd.watcher: real inotify on a spool tree, driven by an asyncio loop."""

import asyncio
import logging
import os
import pwd
import shutil

from mountd.watcher import SpoolWatcher
from tests.fixtures.mountd_env import make_record, write_record

NOBODY = pwd.getpwnam("nobody").pw_uid


async def _collect(loop, seen, n, timeout=5.0):
    deadline = loop.time() + timeout
    while len(seen) < n and loop.time() < deadline:
        await asyncio.sleep(0.05)


def test_watcher_sees_new_hosts_and_records_but_not_dot_files(tmp_path):
    spool = str(tmp_path / "spool")
    os.mkdir(spool)
    os.mkdir(os.path.join(spool, "hostA"), 0o755)

    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        w = SpoolWatcher(spool, seen.append, loop)
        w.start()
        try:
            # A record in an existing host dir (temp file + rename, as sharedd writes).
            write_record(spool, make_record(1, host="hostA", share=None, method="create_share"))
            await _collect(loop, seen, 1)
            assert [os.path.basename(p) for p in seen] == [f"{1:020d}-post-create_share.json"]
            # A temporary dot-file alone triggers nothing.
            with open(os.path.join(spool, "hostA", ".tmp-partial"), "w") as f:
                f.write("{")
            await asyncio.sleep(0.3)
            assert len(seen) == 1
            # A new host directory is noticed and then watched itself.
            os.mkdir(os.path.join(spool, "hostB"), 0o755)
            await _collect(loop, seen, 2)
            assert seen[1] == os.path.join(spool, "hostB")
            write_record(spool, make_record(2, host="hostB", share=None, method="create_share"))
            await _collect(loop, seen, 3)
            assert seen[2].startswith(os.path.join(spool, "hostB") + "/")
            assert os.path.join(spool, "hostB") in w.watched
        finally:
            w.stop()

    asyncio.run(main())


def test_watcher_on_missing_spool_dir_watches_once_it_exists(tmp_path):
    spool = str(tmp_path / "later")

    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        w = SpoolWatcher(spool, seen.append, loop)
        w.start()
        try:
            assert w.watched == {}
            os.makedirs(os.path.join(spool, "h1"), 0o755)
            # The parent's watch notices the spool dir without a rescan.
            await _collect(loop, seen, 1)
            assert seen == [spool]
            assert set(w.watched) == {spool, os.path.join(spool, "h1")}
            w.ensure_watches()            # what every periodic rescan does: nothing new
            assert set(w.watched) == {spool, os.path.join(spool, "h1")}
            write_record(spool, make_record(1, host="h1", share=None, method="create_share"))
            await _collect(loop, seen, 2)
            assert len(seen) == 2 and seen[1].startswith(os.path.join(spool, "h1") + "/")
        finally:
            w.stop()

    asyncio.run(main())


async def _until(loop, pred, timeout=5.0):
    deadline = loop.time() + timeout
    while not pred() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return pred()


def test_spool_dir_deleted_and_recreated_is_watched_again(tmp_path):
    spool = str(tmp_path / "spool")
    os.makedirs(os.path.join(spool, "hostA"), 0o755)

    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        w = SpoolWatcher(spool, seen.append, loop)
        w.start()
        try:
            old_wd = w.watched[spool]
            shutil.rmtree(spool)
            assert await _until(loop, lambda: w.watched == {})
            seen.clear()
            # Recreated with a host dir and a record, no rescan in between.
            path = write_record(spool, make_record(1, host="hostB", share=None,
                                                   method="create_share"))
            assert await _until(loop, lambda: spool in seen)
            assert set(w.watched) == {spool, os.path.join(spool, "hostB")}
            assert w.watched[spool] != old_wd
            # The new directories deliver events themselves.
            os.mkdir(os.path.join(spool, "hostC"), 0o755)
            assert await _until(loop, lambda: os.path.join(spool, "hostC") in seen)
            assert os.path.join(spool, "hostC") in w.watched
            seen.clear()
            os.rename(path, path + ".x")      # a rename inside hostB
            assert await _until(loop, lambda: path + ".x" in seen)
        finally:
            w.stop()

    asyncio.run(main())


def test_spool_dir_replaced_by_rename_is_watched_again(tmp_path, caplog):
    spool = str(tmp_path / "spool")
    os.makedirs(os.path.join(spool, "hostA"), 0o755)
    os.makedirs(str(tmp_path / "new" / "hostN"), 0o755)

    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        w = SpoolWatcher(spool, seen.append, loop)
        w.start()
        try:
            os.rename(spool, str(tmp_path / "old"))
            os.rename(str(tmp_path / "new"), spool)
            assert await _until(loop, lambda: set(w.watched) == {spool, os.path.join(spool, "hostN")})
            seen.clear()
            # The moved-away directory is no longer watched under the spool's name.
            write_record(str(tmp_path / "old"), make_record(1, host="hostA", share=None,
                                                            method="create_share"))
            write_record(spool, make_record(2, host="hostN", share=None, method="create_share"))
            assert await _until(loop, lambda: len(seen) >= 1)
            await asyncio.sleep(0.3)
            assert all(p.startswith(os.path.join(spool, "hostN") + "/") for p in seen), seen
            # pyinotify followed the rename (the parent is watched): no lost-path error.
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        finally:
            w.stop()

    asyncio.run(main())


def test_only_trusted_host_dirs_are_watched(tmp_path, caplog):
    spool = str(tmp_path / "spool")
    os.mkdir(spool)
    good = os.path.join(spool, "good")
    os.mkdir(good, 0o755)
    os.mkdir(os.path.join(spool, "nobodys"), 0o755)
    os.chown(os.path.join(spool, "nobodys"), NOBODY, NOBODY)
    os.mkdir(os.path.join(spool, "groupw"))
    os.chmod(os.path.join(spool, "groupw"), 0o775)
    os.mkdir(os.path.join(spool, "-badname"), 0o755)
    os.mkdir(os.path.join(spool, "x" * 65), 0o755)
    os.symlink(good, os.path.join(spool, "link"))

    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        w = SpoolWatcher(spool, seen.append, loop, allowed_uids=(0,))
        w.start()
        try:
            assert set(w.watched) == {spool, good}
            # Made after start: noticed (the rescan reads it) but not watched.
            late = os.path.join(spool, "late")
            os.mkdir(late, 0o755)
            os.chown(late, NOBODY, NOBODY)
            assert await _until(loop, lambda: late in seen)
            assert late not in w.watched
            w.ensure_watches()
            assert set(w.watched) == {spool, good}
            assert "owned by uid %d" % NOBODY in caplog.text
            assert "writable by group or others" in caplog.text
        finally:
            w.stop()
        # Without an owner check, the other-owned directories are watched.
        w = SpoolWatcher(spool, seen.append, loop, allowed_uids=None)
        w.start()
        try:
            assert set(w.watched) == {spool, good, os.path.join(spool, "nobodys"),
                                      os.path.join(spool, "late")}
        finally:
            w.stop()

    asyncio.run(main())


def test_watches_are_capped_and_the_cap_is_logged_once(tmp_path, caplog):
    spool = str(tmp_path / "spool")
    os.mkdir(spool)
    for i in range(6):
        os.mkdir(os.path.join(spool, f"h{i}"), 0o755)

    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        w = SpoolWatcher(spool, seen.append, loop, allowed_uids=(0,), max_watches=4)
        w.start()
        try:
            assert len(w.watched) == 4 and spool in w.watched
            w.ensure_watches()
            os.mkdir(os.path.join(spool, "h9"), 0o755)
            assert await _until(loop, lambda: os.path.join(spool, "h9") in seen)
            w.ensure_watches()
            assert len(w.watched) == 4
            assert os.path.join(spool, "h9") not in w.watched
            capped = [r for r in caplog.records if "max_watches" in r.getMessage()]
            assert len(capped) == 1 and capped[0].levelname == "WARNING"
            # The kernel holds exactly the watches counted (+1 for the parent).
            with open(f"/proc/self/fdinfo/{w.wm.get_fd()}") as f:
                assert sum(1 for line in f if line.startswith("inotify wd:")) == 5
        finally:
            w.stop()

    asyncio.run(main())
