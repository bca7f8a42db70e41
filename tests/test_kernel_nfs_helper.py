"""KernelNfsHelper: host-side unit tests, and the real kernel NFS server in a
qemu guest.

The host kernel has no NFS server, so the host-side tests drive the helper
against a stand-in ``exportfs`` (a small script that keeps an export table
in a JSON file and logs its argument vectors): they check rendering,
canonical client forms, the lock, the atomic file and bad input.

``test_kernel_nfs_in_guest`` is the real thing: one Debian guest (10.78.0.0/24,
fd78::/64 on a bridge in our own namespace) runs the helper from the 9p repo
share against nfs-kernel-server, on a loop-mounted ext4 share, and proves
every access decision with real ``mount -t nfs4`` mounts. eth0 carries
10.78.0.21/24, 10.78.0.22/32, 10.78.0.23/32 and fd78::21/64; a mount of one
of the guest's own addresses reaches nfsd from that same address (the local
route's source; the /32s make .22 and .23 primary addresses, else the kernel
would use .21 as their source), so each address is a distinct client, and
127.0.0.1 is another.

The guest script is kept here rather than in tests/guest/: every file there
is part of the guest image's cache key, and editing a test would rebuild the
image for everyone.
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from sharedd.config import BackendConfig
from sharedd.errors import BackendFailure, ConfigError, InvalidArgument, NotSupported
from sharedd.helpers.base import Grant
from sharedd.helpers.kernel_nfs import (KernelNfsHelper, client_forms, exportfs_host, fsid,
                                        parse_exportfs_v, resolve, rule_key)
from sharedd.models import AccessRule, Share
from sharedd.record import EXPORT_RE

# A stand-in exportfs: same argument forms and messages as nfs-utils 2.6
# (measured in the guest), table in $FAKE_EXPORTFS_DIR/table.json.
FAKE_EXPORTFS = textwrap.dedent("""\
    #!/usr/bin/python3
    import json, os, sys, time
    d = os.environ["FAKE_EXPORTFS_DIR"]
    table_path = os.path.join(d, "table.json")
    with open(os.path.join(d, "calls.log"), "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    if os.path.exists(os.path.join(d, "fail")) and sys.argv[1:2] == ["-o"]:
        sys.stderr.write("exportfs: forced failure\\n"); sys.exit(1)
    try:
        table = json.load(open(table_path))
    except FileNotFoundError:
        table = {}
    def split(arg):
        if arg.startswith("["):
            host, _, path = arg[1:].partition("]:")
        else:
            host, _, path = arg.partition(":")
        return host, path
    args = sys.argv[1:]
    if args == ["-v"]:
        for key, opts in table.items():
            host, path = key.split(" ", 1)
            host = "<world>" if host == "*" else host
            pad = "\\n\\t\\t" if len(path) > 15 else " " * (16 - len(path)) + "\\t"
            print(f"{path}{pad}{host}(sync,wdelay,hide,{opts},secure)")
        sys.exit(0)
    if args[0] == "-o":
        host, path = split(args[2])
        if not path or host.endswith("/0"):
            sys.stderr.write(f"exportfs: bad {args[2]}\\n"); sys.exit(1)
        table[f"{host} {path}"] = args[1]
    elif args[0] == "-u":
        host, path = split(args[1])
        if f"{host} {path}" not in table:
            sys.stderr.write(f"exportfs: Could not find '{args[1]}' to unexport.\\n")
            sys.exit(1)
        del table[f"{host} {path}"]
    time.sleep(float(os.environ.get("FAKE_EXPORTFS_DELAY", "0")))
    tmp = table_path + ".tmp"
    json.dump(table, open(tmp, "w")); os.rename(tmp, table_path)
""")

OPTS = "sync"
SQUASHED = "root_squash,anonuid=65534,anongid=65534"


def entry(share_id: str, level: str, squash: str = SQUASHED, subtree: str = "no_subtree_check") -> str:
    """The options the helper writes for one client."""
    return f"{OPTS},{fsid(share_id)},{subtree},{level},{squash}"


def rule(to: str, level: str, access_type: str = "ip", state: str = "active",
         squash: str = "", anonuid: int = 65534, anongid: int = 65534) -> AccessRule:
    return AccessRule(id=uuid.uuid4().hex, share_id="", access_type=access_type,
                      access_to=to, access_level=level, state=state, squash=squash,
                      anonuid=anonuid, anongid=anongid)


RW, RO = Grant("rw"), Grant("ro")


def share(sid: str = "") -> Share:
    sid = sid or uuid.uuid4().hex
    return Share(id=sid, name="s" + sid[:8], backend="b1", protocol="NFS", size_gib=1,
                 status="available")


class Fake:
    def __init__(self, root: pathlib.Path):
        self.dir = root / "fake"
        self.dir.mkdir()
        self.cmd = root / "exportfs"
        self.cmd.write_text(FAKE_EXPORTFS)
        self.cmd.chmod(0o755)
        self.exports = root / "exports.d" / "sharedd.exports"

    def table(self) -> dict:
        p = self.dir / "table.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def calls(self) -> list:
        p = self.dir / "calls.log"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    def clients(self, path: str) -> dict:
        """client -> its level (rw or ro)"""
        return {k.split(" ", 1)[0]: next(o for o in v.split(",") if o in ("rw", "ro"))
                for k, v in self.table().items() if k.split(" ", 1)[1] == path}

    def options(self, path: str, client: str) -> list:
        return self.table()[f"{client} {path}"].split(",")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = Fake(tmp_path)
    monkeypatch.setenv("FAKE_EXPORTFS_DIR", str(f.dir))
    return f


def make(fake: Fake, tmp_path, backend: str = "b1", **extra) -> KernelNfsHelper:
    values = {"share_export_ip": "10.78.0.1", "kernel_nfs_exports_file": str(fake.exports),
              "kernel_nfs_export_options": OPTS, "kernel_nfs_exportfs_command": str(fake.cmd)}
    values.update(extra)
    h = KernelNfsHelper(BackendConfig(backend, values), str(tmp_path / f"state-{backend}"),
                        command_timeout=30)
    h.setup()
    return h


# --- canonical forms --------------------------------------------------------------
def test_client_forms_canonical():
    assert client_forms({"10.0.0.5": RW}) == [("10.0.0.5", RW)]
    assert client_forms({"10.0.0.0/24": RO}) == [("10.0.0.0/24", RO)]
    assert client_forms({"fd00::5": RW, "fd00::/64": RW}) == [("fd00::/64", RW)]
    assert client_forms({"0.0.0.0/0": RO}) == [("0.0.0.0/1", RO), ("128.0.0.0/1", RO)]
    assert client_forms({"::/0": RW}) == [("::/1", RW), ("8000::/1", RW)]
    assert client_forms({"0.0.0.0/0": RW, "::/0": RW}) == [("*", RW)]
    assert rule_key("10.0.0.5/32") == "10.0.0.5"
    assert rule_key(" fd00:0::5/128 ") == "fd00::5"
    assert rule_key("10.1.0.0/16") == "10.1.0.0/16"
    assert exportfs_host("fd00::/64") == "[fd00::/64]"
    assert exportfs_host("10.0.0.5") == "10.0.0.5"
    assert exportfs_host("*") == "*"


def test_rw_wins_no_client_in_both_levels():
    import ipaddress
    rules = {"10.0.0.0/24": RO, "10.0.0.5": RW, "10.0.0.128/25": RW,
             "10.0.0.200": RO, "fd00::/64": RO, "fd00::1": RW, "0.0.0.0/0": RO}
    res = [(n, g.level) for n, g in resolve(rules)]
    rw = [n for n, lvl in res if lvl == "rw"]
    ro = [n for n, lvl in res if lvl == "ro"]
    assert not any(a.overlaps(b) for a in rw for b in ro if a.version == b.version)
    for probe, want in (("10.0.0.5", "rw"), ("10.0.0.6", "ro"), ("10.0.0.200", "rw"),
                        ("10.0.0.129", "rw"), ("192.168.1.1", "ro"), ("fd00::1", "rw"),
                        ("fd00::2", "ro"), ("fe80::1", None)):
        addr = ipaddress.ip_address(probe)
        got = [lvl for n, lvl in res if n.version == addr.version and addr in n]
        assert got == ([want] if want else []), (probe, got)
    forms = [(c, g.level) for c, g in client_forms(rules)]
    assert forms[0][1] == "rw" and all(lvl == "rw" for _, lvl in forms[:3])
    assert not any(c.endswith("/0") for c, _ in forms)


def test_parse_exportfs_v_defensive():
    text = ("/srv/a        \t10.78.0.21(sync,wdelay,rw)\n"
            "/srv/a        \tfd78::/64(sync,rw)\n"
            "/srv/a-very-long-path-name\n\t\t<world>(sync,ro)\n"
            "garbage line here\n\t\torphan(rw)\n"
            "/srv/b\t10.78.0.0/255.255.255.0(ro)\n\n")
    assert parse_exportfs_v(text) == {
        "/srv/a": ["10.78.0.21", "fd78::/64"], "/srv/a-very-long-path-name": ["*"],
        "/srv/b": ["10.78.0.0/255.255.255.0"]}
    assert parse_exportfs_v("") == {}


# --- the helper against the stand-in -----------------------------------------------
def test_export_renders_file_and_kernel(fake, tmp_path):
    h = make(fake, tmp_path)
    s = share()
    locs = h.export(s, "/srv/shares/one", [rule("10.78.0.21", "rw"), rule("10.78.0.22/32", "ro"),
                                           rule("fd78::21", "rw"), rule("fd78::/64", "ro")])
    assert locs == ["10.78.0.1:/srv/shares/one"]
    text = fake.exports.read_text()
    assert f"/srv/shares/one 10.78.0.21({entry(s.id, 'rw')}) fd78::21({entry(s.id, 'rw')}) " \
           f"10.78.0.22({entry(s.id, 'ro')}) " in text
    assert json.dumps({"backend": "b1", "share": s.id}, sort_keys=True) in text
    assert fake.clients("/srv/shares/one")["fd78::21"] == "rw"
    assert fake.clients("/srv/shares/one")["10.78.0.22"] == "ro"
    assert ["-o", entry(s.id, "rw"), "[fd78::21]:/srv/shares/one"] in fake.calls()
    # Idempotent: same file, same table.
    before = (text, fake.table())
    h.export(s, "/srv/shares/one", [rule("10.78.0.21", "rw"), rule("10.78.0.22", "ro"),
                                    rule("fd78::21", "rw"), rule("fd78::/64", "ro")])
    assert (fake.exports.read_text(), fake.table()) == before
    assert oct(fake.exports.stat().st_mode & 0o777) == "0o644"
    # No temp files left beside it; the lock file is hidden and not *.exports.
    names = sorted(p.name for p in fake.exports.parent.iterdir())
    assert names == [".sharedd.exports.lock", "sharedd.exports"]


def test_update_access_delta_and_recovery(fake, tmp_path):
    h = make(fake, tmp_path)
    s, p = share(), "/srv/shares/two"
    h.export(s, p, [rule("10.78.0.21", "rw")])
    h.update_access(s, p, [], add_rules=[rule("10.78.0.21", "rw"), rule("10.78.0.0/24", "ro")],
                    delete_rules=[rule("10.9.9.9", "rw")])      # re-add; never applied
    c = fake.clients(p)
    assert c["10.78.0.21"] == "rw" and "10.78.0.0/24" not in c   # split around .21
    assert c["10.78.0.128/25"] == "ro" and c["10.78.0.20"] == "ro"
    h.update_access(s, p, [], add_rules=[], delete_rules=[rule("10.78.0.0/24", "ro")])
    assert fake.clients(p) == {"10.78.0.21": "rw"}
    # Recovery: the full list, whatever was there before (a stray client too).
    subprocess.run([str(fake.cmd), "-o", "ro", f"10.1.2.3:{p}"], check=True)
    h.update_access(s, p, [rule("10.78.0.22", "ro"), rule("0.0.0.0/0", "rw", state="queued_to_deny")],
                    [], [])
    assert fake.clients(p) == {"10.78.0.22": "ro"}
    assert f"{p} 10.78.0.22({entry(s.id, 'ro')})\n" in fake.exports.read_text()
    # Nobody allowed: no line in the file, nothing in the kernel, still tracked.
    h.update_access(s, p, [], [], [rule("10.78.0.22", "ro")])
    assert fake.clients(p) == {} and p not in fake.exports.read_text()
    assert h.exported_share_ids() == [s.id]


def test_unexport_every_client_and_idempotent(fake, tmp_path):
    h = make(fake, tmp_path)
    s, p = share(), "/srv/shares/three"
    other = share()
    h.export(s, p, [rule("10.78.0.21", "rw"), rule("fd78::/64", "ro")])
    h.export(other, "/srv/shares/four", [rule("10.78.0.21", "rw")])
    subprocess.run([str(fake.cmd), "-o", "ro", f"*:{p}"], check=True)   # made by hand
    h.unexport(s, p)
    assert fake.clients(p) == {}
    assert ["-u", f"[fd78::/64]:{p}"] in fake.calls() and ["-u", f"*:{p}"] in fake.calls()
    assert p not in fake.exports.read_text()
    assert "/srv/shares/four 10.78.0.21" in fake.exports.read_text()
    h.unexport(s, p)          # again: nothing to do, no error
    assert h.exported_share_ids() == [other.id]


def test_two_backends_share_the_file(fake, tmp_path):
    a, b = make(fake, tmp_path, "ba"), make(fake, tmp_path, "bb")
    sa, sb = share(), share()
    a.export(sa, "/srv/a", [rule("10.78.0.21", "rw")])
    b.export(sb, "/srv/b", [rule("10.78.0.22", "ro")])
    a.update_access(sa, "/srv/a", [], [rule("10.78.0.23", "ro")], [])
    text = fake.exports.read_text()
    assert "/srv/a 10.78.0.21" in text and "/srv/b 10.78.0.22" in text
    b.unexport(sb, "/srv/b")
    text = fake.exports.read_text()
    assert "/srv/a 10.78.0.21" in text and "/srv/b" not in text


def test_an_operation_reads_no_other_share_state(fake, tmp_path, monkeypatch):
    """The exports file is rewritten from the lines kept in memory: a change
    to one share reads that share's state only (the other shares' state
    files are read once), and the file is what the state files say."""
    h = make(fake, tmp_path)
    shares = [share() for _ in range(20)]
    for i, s in enumerate(shares):
        h.export(s, f"/srv/{s.id}", [rule(f"10.78.3.{i + 1}", "rw")])
    reads = []
    real = h._read_state
    monkeypatch.setattr(h, "_read_state", lambda sid: reads.append(sid) or real(sid))
    h.update_access(shares[3], f"/srv/{shares[3].id}", [], [rule("10.78.4.1", "ro")], [])
    h.unexport(shares[5], f"/srv/{shares[5].id}")
    assert sorted(set(reads)) == sorted({shares[3].id, shares[5].id}), reads
    text = fake.exports.read_text()
    assert f"/srv/{shares[3].id} 10.78.3.4(" in text and "10.78.4.1(" in text
    assert f"/srv/{shares[5].id}" not in text
    fresh = make(fake, tmp_path)                 # a new process: from the state files
    assert fresh.render_file() == text


def test_a_removed_exports_file_does_not_bring_back_other_backends_lines(fake, tmp_path):
    """The other backends' lines are re-read when the file changed; a file
    removed under the helper took them along (each backend writes its own
    back at its next change), on every later write alike."""
    a, b = make(fake, tmp_path, "ba"), make(fake, tmp_path, "bb")
    sa, sb = share(), share()
    a.export(sa, "/srv/a", [rule("10.78.0.21", "rw")])
    b.export(sb, "/srv/b", [rule("10.78.0.22", "ro")])
    a.update_access(sa, "/srv/a", [], [rule("10.78.0.23", "ro")], [])
    assert "/srv/b 10.78.0.22" in fake.exports.read_text()
    fake.exports.unlink()
    for extra in ("10.78.0.24", "10.78.0.40"):
        a.update_access(sa, "/srv/a", [], [rule(extra, "ro")], [])
        text = fake.exports.read_text()
        assert f"{extra}(" in text and "/srv/b" not in text
    b.update_access(sb, "/srv/b", [], [rule("10.78.0.26", "ro")], [])
    assert "/srv/a 10.78.0.21" in fake.exports.read_text()


def test_bad_input_changes_nothing(fake, tmp_path):
    h = make(fake, tmp_path)
    s, p = share(), "/srv/shares/five"
    h.export(s, p, [rule("10.78.0.21", "rw")])
    before = (fake.exports.read_text(), fake.table(), len(fake.calls()))
    with pytest.raises(InvalidArgument):
        h.update_access(s, p, [], [rule("10.78.0.300", "rw")], [])
    with pytest.raises(InvalidArgument):
        h.update_access(s, p, [], [rule("10.78.0.1/24", "rw")], [])   # host bits set
    with pytest.raises(InvalidArgument):
        h.export(s, p, [rule("x; rm -rf /", "rw")])
    with pytest.raises(NotSupported):
        h.update_access(s, p, [], [rule("alice", "rw", access_type="user")], [])
    with pytest.raises(NotSupported):
        h.update_access(s, p, [], [rule("10.78.0.5", "admin")], [])
    with pytest.raises(NotSupported):
        h.export(s, p, [rule("::ffff:10.0.0.1", "rw")])
    for bad_path in ("relative/path", "/srv/with space", "/srv/a(rw)", "/srv/../etc", "/",
                     "/srv/x\n/etc 1.2.3.4(rw)", "/srv/q\"uote"):
        with pytest.raises(BackendFailure):
            h.export(s, bad_path, [rule("10.78.0.21", "rw")])
        with pytest.raises(BackendFailure):
            h.mount_hints(s, bad_path)
    with pytest.raises(InvalidArgument):
        h.export(share("../../etc/passwd"), p, [])
    assert (fake.exports.read_text(), fake.table(), len(fake.calls())) == before
    with pytest.raises(NotSupported):
        h.validate_rule(rule("10.0.0.1", "rw", access_type="cert"))
    h.validate_rule(rule("fd78::/64", "ro"))


def test_failed_exportfs_restores_previous_state(fake, tmp_path):
    h = make(fake, tmp_path)
    s, p = share(), "/srv/shares/six"
    h.export(s, p, [rule("10.78.0.21", "rw")])
    text, table = fake.exports.read_text(), fake.table()
    (fake.dir / "fail").touch()
    with pytest.raises(BackendFailure, match="forced failure"):
        h.update_access(s, p, [], [rule("10.78.0.22", "ro")], [])
    (fake.dir / "fail").unlink()
    assert fake.exports.read_text() == text and fake.table() == table
    # A first export that fails leaves nothing behind.
    s2 = share()
    (fake.dir / "fail").touch()
    with pytest.raises(BackendFailure):
        h.export(s2, "/srv/shares/seven", [rule("10.78.0.21", "rw")])
    (fake.dir / "fail").unlink()
    assert "/srv/shares/seven" not in fake.exports.read_text()
    assert h.exported_share_ids() == [s.id]


def test_locking_serializes_processes(fake, tmp_path, monkeypatch):
    """Two processes and threads changing the file at once lose nothing: each
    rewrite happens under the flock, so every share's line survives."""
    monkeypatch.setenv("FAKE_EXPORTFS_DELAY", "0.05")
    h = make(fake, tmp_path)
    repo = pathlib.Path(__file__).resolve().parents[1]
    child = textwrap.dedent(f"""
        import sys, uuid
        sys.path.insert(0, {str(repo)!r})
        from sharedd.config import BackendConfig
        from sharedd.helpers.kernel_nfs import KernelNfsHelper
        from sharedd.models import AccessRule, Share
        h = KernelNfsHelper(BackendConfig("b2", {{"share_export_ip": "10.78.0.1",
            "kernel_nfs_exports_file": {str(fake.exports)!r},
            "kernel_nfs_exportfs_command": {str(fake.cmd)!r}}}), {str(tmp_path / "state-b2")!r})
        for i in range(4):
            s = Share("child%d" % i, "c", "b2", "NFS", 1, "available")
            h.export(s, "/srv/child%d" % i, [AccessRule("r", s.id, "ip", "10.78.1.%d" % (i + 1),
                                                          "rw", "active")])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child])]
    errors = []

    def worker(n):
        try:
            for i in range(3):
                h.export(share(f"t{n}x{i}"), f"/srv/t{n}x{i}", [rule(f"10.78.2.{n * 10 + i}", "ro")])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert procs[0].wait(60) == 0 and not errors
    text = fake.exports.read_text()
    for i in range(4):
        assert f"/srv/child{i} 10.78.1.{i + 1}(" in text
    for n in range(2):
        for i in range(3):
            assert f"/srv/t{n}x{i} 10.78.2.{n * 10 + i}(" in text
    assert len(fake.table()) == 10


def test_config_checks_and_hints(fake, tmp_path):
    with pytest.raises(ConfigError):
        make(fake, tmp_path, kernel_nfs_exports_file="/etc/exports")
    for own in ("rw", "no_root_squash", "root_squash", "anonuid=0", "fsid=1", "no_subtree_check",
                "subtree_check"):
        with pytest.raises(ConfigError, match="leave out"):
            make(fake, tmp_path, kernel_nfs_export_options=f"sync,{own}")
    with pytest.raises(ConfigError):
        make(fake, tmp_path, kernel_nfs_export_options="sync,no_root_squash) * (rw")
    with pytest.raises(ConfigError):
        make(fake, tmp_path, kernel_nfs_exportfs_command="exportfs -r")
    h = make(fake, tmp_path, share_export_ip="fd78::1")
    hints = h.mount_hints(share(), "/srv/shares/x-1.2_3")
    assert hints == {"fstype": "nfs4", "export": "[fd78::1]:/srv/shares/x-1.2_3",
                     "options": ["vers=4.1", "proto=tcp6"]}
    assert re.match(EXPORT_RE, hints["export"])
    assert h.export_locations(share(), "/srv/x") == ["[fd78::1]:/srv/x"]
    broken = KernelNfsHelper(BackendConfig("b9", {"kernel_nfs_exports_file": str(fake.exports),
                                                  "kernel_nfs_exportfs_command": str(tmp_path / "nope")}),
                             str(tmp_path / "s9"))
    with pytest.raises(BackendFailure):
        broken.export(share(), "/srv/x", [rule("10.0.0.1", "rw")])
    with pytest.raises(BackendFailure, match="nfs-kernel-server"):
        KernelNfsHelper(BackendConfig("b8", {"kernel_nfs_exports_file": str(fake.exports),
                                             "kernel_nfs_exportfs_command": str(tmp_path / "nope")}),
                        str(tmp_path / "s8")).setup()


def test_squash_fsid_and_subtree_per_rule_and_share(fake, tmp_path):
    """Each client entry carries its rule's squash (root_squash unless the rule
    or the backend's default_squash says otherwise), each share its own fsid,
    and subtree_check where the driver's shares share a file system."""
    h = make(fake, tmp_path, default_squash="all_squash", default_anonuid=1000,
             default_anongid=1001)
    s, p = share(), "/srv/shares/sq"
    h.export(s, p, [rule("10.78.0.21", "rw", squash="no_root_squash", anonuid=7, anongid=8),
                    rule("10.78.0.22", "rw"),                       # stored before squash
                    rule("10.78.0.23", "ro", squash="root_squash")])
    assert fake.options(p, "10.78.0.21")[-4:] == ["rw", "no_root_squash", "anonuid=7", "anongid=8"]
    assert fake.options(p, "10.78.0.22")[-4:] == ["rw", "all_squash", "anonuid=1000",
                                                   "anongid=1001"]
    assert fake.options(p, "10.78.0.23")[-4:] == ["ro", "root_squash", "anonuid=65534",
                                                   "anongid=65534"]
    assert re.search(r"fsid=[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12},",
                     fake.exports.read_text())
    other = share()
    h.isolate_subtrees = True
    h.export(other, "/srv/shares/b", [rule("10.78.0.21", "rw")])
    opts = fake.options("/srv/shares/b", "10.78.0.21")
    assert "subtree_check" in opts and "no_subtree_check" not in opts
    assert fsid(other.id) in opts and fsid(other.id) != fsid(s.id) and fsid(s.id) == fsid(s.id)
    # A state file written before squash existed ([client, level]) still reads,
    # with the safe default, and is rewritten in the new form by the next change.
    state = tmp_path / "state-b1" / f"{s.id}.json"
    data = json.loads(state.read_text())
    data["rules"] = [["10.78.0.21", "rw"]]
    state.write_text(json.dumps(data))
    h.update_access(s, p, [], [rule("10.78.0.30", "ro")], [])
    assert fake.options(p, "10.78.0.21")[-4:] == ["rw", "root_squash", "anonuid=65534",
                                                   "anongid=65534"]
    assert json.loads(state.read_text())["rules"][0] == ["10.78.0.21",
                                                         ["rw", "root_squash", 65534, 65534]]


def test_overlapping_networks_give_root_the_least():
    """Within one level the stricter squash wins where networks overlap, as
    rw wins over ro: no client is matched by two entries."""
    import ipaddress
    rules = {"10.0.0.0/24": Grant("rw", "no_root_squash"), "10.0.0.5": Grant("rw", "root_squash"),
             "10.0.0.0/16": Grant("ro", "all_squash")}
    res = resolve(rules)
    for probe, want in (("10.0.0.5", Grant("rw", "root_squash")),
                        ("10.0.0.6", Grant("rw", "no_root_squash")),
                        ("10.0.1.1", Grant("ro", "all_squash"))):
        addr = ipaddress.ip_address(probe)
        assert [g for n, g in res if addr in n] == [want], probe


# --- the real kernel NFS server in a qemu guest ----------------------------------------
SUBNET4, SUBNET6 = "10.78.0.0/24", "fd78::/64"
G1, G2, G3, G6 = "10.78.0.21", "10.78.0.22", "10.78.0.23", "fd78::21"

GUEST_SCRIPT = r'''#!/usr/bin/python3
"""Runs inside the guest: the helper from /mnt/repo against nfs-kernel-server."""
import errno, json, os, subprocess, sys, time, uuid
sys.path.insert(0, "/mnt/repo")
from tests.support.guestlib import sh
from sharedd.config import BackendConfig
from sharedd.helpers.kernel_nfs import KernelNfsHelper, parse_exportfs_v
from sharedd.models import AccessRule, Share

T0 = time.monotonic()
FORMS_LIST = @FORMS@
ADDRS = {"a21": "10.78.0.21", "a22": "10.78.0.22", "a23": "10.78.0.23",
         "lo": "127.0.0.1", "v6": "[fd78::21]"}

def say(key, value):
    print(f"RESULT {key}={value}", flush=True)
    print(f"TIME {key} {int((time.monotonic() - T0) * 1000)} ms", flush=True)

def rule(to, level, state="active"):
    return AccessRule(uuid.uuid4().hex, "s1", "ip", to, level, state)

# The share: its own ext4 file system on a loop device, as a driver makes it.
sh("truncate", "-s", "64M", "/var/tmp/share.img")
sh("mkfs.ext4", "-q", "-F", "/var/tmp/share.img")
PATH = "/srv/shares/s1"
os.makedirs(PATH)
sh("mount", "-o", "loop", "/var/tmp/share.img", PATH)
os.chmod(PATH, 0o777)     # as drivers make NFS share roots: squashed root can write
os.makedirs("/mnt/c", exist_ok=True)

cfg = BackendConfig("guest", {"share_export_ip": "10.78.0.21"})
h = KernelNfsHelper(cfg, "/var/lib/sharedd-test/kernel", command_timeout=60)
h.setup()
share = Share("s1", "one", "guest", "NFS", 1, "available")
hints = h.mount_hints(share, PATH)
say("hints", json.dumps(hints, sort_keys=True))

def probe(name):
    """rw | ro | denied | error:... for one client address, by a real mount."""
    export = hints["export"].replace("10.78.0.21", ADDRS[name])
    opts = ",".join(hints["options"] + ["timeo=30", "retrans=1"])
    if name == "v6":
        opts = opts.replace("proto=tcp", "proto=tcp6")
    m = sh("timeout", "60", "mount", "-t", hints["fstype"], "-o", opts, export, "/mnt/c", check=False)
    if m.returncode != 0:
        return "denied" if "access denied" in m.stderr else "error:" + m.stderr.strip()[-120:]
    try:
        fname = f"/mnt/c/w-{name}-{uuid.uuid4().hex[:6]}"
        try:
            with open(fname, "w") as f:
                f.write(name)
        except OSError as exc:
            return "ro" if exc.errno == errno.EROFS else f"error:{exc}"
        # The write really reached the share's file system.
        with open(PATH + "/" + os.path.basename(fname)) as f:
            return "rw" if f.read() == name else "error:content"
    finally:
        u = sh("umount", "/mnt/c", check=False)
        if u.returncode:
            say("client_umount_failed", u.stderr.strip())

def probe_all(phase):
    t = time.monotonic()
    got = {n: probe(n) for n in ADDRS}
    say(phase, json.dumps(got, sort_keys=True))
    say(phase + "_seconds", f"{time.monotonic() - t:.1f}")

def table_of(path):
    return parse_exportfs_v(sh("exportfs", "-v").stdout).get(path, [])

def table():
    return table_of(PATH)

def exports_file():
    with open("/etc/exports.d/sharedd.exports") as f:
        return f.read()

# 1. export: .21 rw, .22 ro, fd78::21 rw; .23 and 127.0.0.1 unlisted.
t = time.monotonic()
locs = h.export(share, PATH, [rule("10.78.0.21", "rw"), rule("10.78.0.22/32", "ro"),
                              rule("fd78::21/128", "rw")])
say("export_seconds", f"{time.monotonic() - t:.2f}")
say("locations", json.dumps(locs))
say("table1", json.dumps(sorted(table())))
say("file1", json.dumps(exports_file()))
probe_all("p1")
# root on the client wrote it: the default root_squash made it the anonymous uid's
owners = {os.stat(os.path.join(PATH, n)).st_uid for n in os.listdir(PATH) if n.startswith("w-a21")}
say("p1_owner_a21", json.dumps(sorted(owners)))
before = sh("exportfs", "-v").stdout
h.export(share, PATH, [rule("10.78.0.21", "rw"), rule("10.78.0.22", "ro"), rule("fd78::21", "rw")])
say("idempotent", sh("exportfs", "-v").stdout == before)

# 2. delta: add everyone-IPv4 ro and re-add .21; delete .22, fd78::21 and a never-applied rule.
t = time.monotonic()
h.update_access(share, PATH, [], add_rules=[rule("0.0.0.0/0", "ro"), rule("10.78.0.21", "rw")],
                delete_rules=[rule("10.78.0.22", "ro"), rule("fd78::21", "rw"), rule("10.9.9.9", "rw")])
say("delta_seconds", f"{time.monotonic() - t:.2f}")
say("table2_has_slash0", any(c.endswith("/0") or c == "*" for c in table()))
probe_all("p2")

# 3. recovery: exactly [.21 ro, .22 rw, ::/0 ro] (.21 changes level in place).
h.update_access(share, PATH, [rule("10.78.0.21", "ro"), rule("10.78.0.22", "rw"), rule("::/0", "ro"),
                              rule("10.78.0.23", "rw", state="queued_to_deny")], [], [])
say("table3", json.dumps(sorted(table())))
probe_all("p3")

# 4. the file alone restores the same exports (what nfs-server does at boot).
before = sorted(sh("exportfs", "-v").stdout.splitlines())
sh("exportfs", "-ua")
say("after_ua", json.dumps(table()))
sh("exportfs", "-a")
say("file_restores", sorted(sh("exportfs", "-v").stdout.splitlines()) == before)

# 4b. every accepted rule form, as exportfs itself reads it back (the forms
# are the API's canonical ones, computed on the host).
fpath = "/srv/shares/forms"
os.makedirs(fpath, exist_ok=True)
fshare = Share("forms", "forms", "guest", "NFS", 1, "available")
readback = {}
for form in FORMS_LIST:
    h.export(fshare, fpath, [rule(form, "ro")])
    readback[form] = sorted(table_of(fpath))
h.unexport(fshare, fpath)
say("forms", json.dumps(readback, sort_keys=True))

# 5. exported mounts are busy; unexport, then the driver's umount works.
u = sh("umount", PATH, check=False)
say("umount_while_exported", f"{u.returncode}:{u.stderr.strip()}")
say("refs_before_unexport", h.nfsd_references(PATH))
t = time.monotonic()
h.unexport(share, PATH)
say("unexport_seconds", f"{time.monotonic() - t:.2f}")
say("refs_after_unexport", h.nfsd_references(PATH))
# The driver unmounts right after.
def diag(tag):
    out = []
    for name in ("/proc/net/rpc/nfsd.export/content", "/proc/net/rpc/nfsd.fh/content",
                 "/proc/net/rpc/auth.unix.ip/content", "/proc/fs/nfsd/filecache"):
        try:
            out.append(name + ":\n" + open(name).read())
        except OSError as exc:
            out.append(f"{name}: {exc}")
    for root, dirs, files in os.walk("/proc/fs/nfsd/clients"):
        for fn in files:
            if fn in ("info", "states"):
                out.append(f"{root}/{fn}:\n" + open(os.path.join(root, fn)).read())
    say("diag_" + tag, json.dumps("\n".join(out)))
t = time.monotonic()
u = sh("umount", PATH, check=False)
say("umount_after_unexport", f"{u.returncode}:{u.stderr.strip()}")
if u.returncode:
    diag("busy")
    say("flush", sh("exportfs", "-f", check=False).returncode)
    for tries in range(1, 121):
        u = sh("umount", PATH, check=False)
        if u.returncode == 0:
            break
        if tries == 1:
            diag("after_flush")
        time.sleep(0.5)
    say("umount_retry", f"{u.returncode}:tries={tries} {time.monotonic() - t:.1f}s {u.stderr.strip()}")
say("table5", json.dumps(table()))
say("file5_has_path", PATH in exports_file())
probe_all("p5")
h.unexport(share, PATH)
say("unexport_again", "ok")
sys.exit(0)
'''


def _results(res) -> dict:
    return dict(m.groups() for m in re.finditer(r"^RESULT (\w+)=(.*)$", res.output, re.M))


def test_kernel_nfs_in_guest(qemu_guest_image, capsys):
    from tests.fixtures.netlab import make_lab
    from tests.fixtures.qemu_guest import run_in_guest

    with make_lab(SUBNET4, SUBNET6) as lab:
        t0 = time.monotonic()
        from sharedd.validation import ip_rule
        from tests.support.forms import ACCEPTED_FORMS
        canonical = sorted({ip_rule(f) for f in ACCEPTED_FORMS})
        res = run_in_guest(GUEST_SCRIPT.replace("@FORMS@", json.dumps(canonical)),
                           netns=lab.server_ns, bridge="br0",
                           ip_cidr=[f"{G1}/24", f"{G2}/32", f"{G3}/32", f"{G6}/64"],
                           hostname="knfs-server", image=qemu_guest_image, timeout=600)
        total = time.monotonic() - t0
    r = _results(res)
    with capsys.disabled():
        print(f"\n[kernel nfs guest] boot {res.boot_seconds} s, cycle {res.seconds:.1f} s, "
              f"total {total:.1f} s; steps (ms): "
              + ", ".join(f"{k} {v}" for k, v in re.findall(r"^TIME (\w+) (\d+) ms$",
                                                              res.output, re.M)))
        for key, value in r.items():
            if key.startswith("diag"):
                value = json.loads(value)
            if not key.startswith("file"):
                print(f"[kernel nfs guest] {key} = {value}")
    assert res.returncode == 0 and not res.timed_out, res.describe()
    d = res.describe()
    hints = json.loads(r["hints"])
    assert hints == {"fstype": "nfs4", "export": "10.78.0.21:/srv/shares/s1",
                     "options": ["vers=4.1", "proto=tcp"]}, d
    assert json.loads(r["locations"]) == ["10.78.0.21:/srv/shares/s1"], d
    assert json.loads(r["table1"]) == sorted(["10.78.0.21", "10.78.0.22", "fd78::21"]), d
    line = [x for x in json.loads(r["file1"]).splitlines() if x.startswith("/")]
    assert line == [f"/srv/shares/s1 10.78.0.21({entry('s1', 'rw')}) fd78::21({entry('s1', 'rw')}) "
                    f"10.78.0.22({entry('s1', 'ro')})"], d
    # 1. rw, ro (EROFS), denied, IPv6; root's file belongs to the anonymous uid.
    assert json.loads(r["p1"]) == {"a21": "rw", "a22": "ro", "a23": "denied",
                                   "lo": "denied", "v6": "rw"}, d
    assert json.loads(r["p1_owner_a21"]) == [65534], d
    assert r["idempotent"] == "True", d
    # 2. delta: everyone-IPv4 ro (written as two /1 halves, not admitting IPv6), .21 still rw.
    assert r["table2_has_slash0"] == "False", d
    assert json.loads(r["p2"]) == {"a21": "rw", "a22": "ro", "a23": "ro",
                                   "lo": "ro", "v6": "denied"}, d
    # 3. recovery: the full list, .21 downgraded in place; ::/0 as halves.
    assert "::/1" in json.loads(r["table3"]) and "8000::/1" in json.loads(r["table3"]), d
    assert json.loads(r["p3"]) == {"a21": "ro", "a22": "rw", "a23": "denied",
                                   "lo": "denied", "v6": "ro"}, d
    # 4. reboot equivalence.
    assert json.loads(r["after_ua"]) == [], d
    assert r["file_restores"] == "True", d
    # 4b. exportfs reads back exactly the network each accepted form grants.
    from tests.support.forms import addresses
    forms = json.loads(r["forms"])
    assert sorted(forms) == canonical, d
    for form, clients in forms.items():
        seen = ["0.0.0.0/0", "::/0"] if clients == ["*"] else clients
        seen = [str(ipaddress.ip_network(c, strict=True)) for c in seen]
        assert addresses(seen) == addresses([form]), (form, clients)
    # 5. unexport before unmount.
    assert not r["umount_while_exported"].startswith("0:"), d
    assert json.loads(r["table5"]) == [] and r["file5_has_path"] == "False", d
    assert json.loads(r["p5"]) == {"a21": "denied", "a22": "denied", "a23": "denied",
                                   "lo": "denied", "v6": "denied"}, d
    assert r["unexport_again"] == "ok", d
    assert int(r["refs_before_unexport"]) > 0 and r["refs_after_unexport"] == "0", d
    assert r["umount_after_unexport"].startswith("0:"), d


def test_nfsd_references_and_wait(fake, tmp_path):
    """The cache files' format as read in the guest (expired entries carry '# ')."""
    h = make(fake, tmp_path)
    exp, fh = tmp_path / "nfsd.export", tmp_path / "nfsd.fh"
    exp.write_text("#path domain(flags)\n"
                   "# /srv/shares/s1\t10.78.0.22(rw,no_root_squash,sync,uuid=e8:b7,sec=1)\n"
                   "/srv/shares/s10\t10.78.0.21(ro,sec=1)\n"
                   "# /srv/shares\t10.78.0.21(ro,insecure,v4root,sec=390003)\n")
    fh.write_text("#domain fsidtype fsid [path]\n"
                  "# 64.0.0.0/2 6 0x93dc4ce88b4c1cb7 /srv/shares/s1\n"
                  "# 10.78.0.21 7 0x0000417700000000 /srv/shares\n")
    h.CACHE_FILES = (str(exp), str(fh), str(tmp_path / "missing"))
    assert h.nfsd_references("/srv/shares/s1") == 2
    assert h.nfsd_references("/srv/shares/s10") == 1
    assert h.nfsd_references("/srv/other") == 0
    t = time.monotonic()
    assert h.wait_released("/srv/shares/s1", 0.5) is False
    assert time.monotonic() - t >= 0.5
    timer = threading.Timer(1.0, lambda: (exp.write_text(""), fh.write_text("")))
    timer.start()
    try:
        assert h.wait_released("/srv/shares/s1", 30) is True
    finally:
        timer.cancel()
