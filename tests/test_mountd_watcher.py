"""mountd.watcher: real inotify on a spool tree, driven by an asyncio loop."""

import asyncio
import os

from mountd.watcher import SpoolWatcher
from tests.fixtures.mountd_env import make_record, write_record


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
            w.ensure_watches()            # what every periodic rescan does
            assert set(w.watched) == {spool, os.path.join(spool, "h1")}
            write_record(spool, make_record(1, host="h1", share=None, method="create_share"))
            await _collect(loop, seen, 1)
            assert len(seen) == 1
        finally:
            w.stop()

    asyncio.run(main())
