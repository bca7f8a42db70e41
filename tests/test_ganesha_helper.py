"""GaneshaHelper against a real NFS-Ganesha and real libnfs clients.

Clients live in namespaces of the session's netlab (10.71.0.0/24,
fd71::/64); the exported directories are on a small tmpfs mounted on the
host (ganesha's VFS backend needs a real file system with file handles;
tmpfs has them).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid

import pytest

from sharedd.config import BackendConfig
from sharedd.errors import (BackendFailure, CapacityExceeded, InvalidArgument,
                            NotFound, NotSupported)
from sharedd.helpers.ganesha import GaneshaHelper
from sharedd.models import AccessRule, Share
from tests.support.forms import ACCEPTED_FORMS, addresses

A4, B4, C4 = "10.71.0.11", "10.71.0.12", "10.71.0.13"
D6 = "fd71::21"
E4, E6 = "10.71.0.14", "fd71::14"


# --- fixtures -------------------------------------------------------------------
@pytest.fixture(scope="module")
def clients(netlab):
    return {
        "a": netlab.add_client("gh-a", ip4=A4),
        "b": netlab.add_client("gh-b", ip4=B4),
        "c": netlab.add_client("gh-c", ip4=C4),
        "d": netlab.add_client("gh-d", ip6=D6),          # IPv6 only
        "e": netlab.add_client("gh-e", ip4=E4, ip6=E6),   # dual stack
    }


@pytest.fixture(scope="module")
def by_name(clients):
    """Client name -> namespace; a name ending in 6 reaches the server over IPv6."""
    return dict(clients, e6=clients["e"])


@pytest.fixture(scope="module")
def fsroot():
    tmp = tempfile.mkdtemp(prefix=f"sharedd-gh-{os.getpid()}-")
    mnt = os.path.join(tmp, "fs")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "tmpfs", mnt],
                   check=True, timeout=30)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", mnt], timeout=30)
        os.rmdir(mnt)
        os.rmdir(tmp)


def _config(**extra) -> BackendConfig:
    values = {"share_export_ip": "10.71.0.1", "ganesha_export_id_min": 100,
              "ganesha_export_id_max": 65535, "ganesha_pseudo_prefix": "/shares"}
    values.update(extra)
    return BackendConfig("gh", values)


@pytest.fixture
def make_helper(ganesha, tmp_path):
    made = []

    def make(**extra) -> GaneshaHelper:
        state = tmp_path / f"state{len(made)}"
        h = GaneshaHelper(_config(**extra), str(state), command_timeout=30)
        h.setup()
        made.append(h)
        return h

    yield make
    for h in made:   # take every export down: the next test starts clean
        for name in os.listdir(h.state_dir):
            if name.endswith(".conf") and not name.startswith("."):
                h.unexport(Share(name[:-5], name[:-5], "gh", "NFS", 1, "available"), "/")


@pytest.fixture
def helper(make_helper):
    return make_helper()


def new_share(fsroot, content: str = "hello\n"):
    sid = uuid.uuid4().hex
    share = Share(id=sid, name="s" + sid[:8], backend="gh", protocol="NFS",
                  size_gib=1, status="available")
    path = os.path.join(fsroot, sid)
    os.mkdir(path)
    os.chmod(path, 0o777)
    with open(os.path.join(path, "hello"), "w") as f:
        f.write(content)
    return share, path


def rule(to: str, level: str, access_type: str = "ip", state: str = "active",
         squash: str = "", anonuid: int = 65534, anongid: int = 65534) -> AccessRule:
    return AccessRule(id=uuid.uuid4().hex, share_id="", access_type=access_type,
                      access_to=to, access_level=level, state=state, squash=squash,
                      anonuid=anonuid, anongid=anongid)


@pytest.fixture(scope="module")
def payload():
    tmp = tempfile.mkdtemp(prefix=f"sharedd-gh-payload-{os.getpid()}-")
    path = os.path.join(tmp, "payload")
    with open(path, "w") as f:
        f.write("written over nfs\n")
    yield path
    os.unlink(path)
    os.rmdir(tmp)


class Check:
    """What each client can do with a share, via the real libnfs tools."""

    def __init__(self, ganesha, clients, share, helper, payload):
        self.g, self.c, self.payload = ganesha, clients, payload
        self.pseudo = helper.pseudo_path(share)

    def host(self, who):
        return self.g.lab.server_ip6 if who == "d" or who.endswith("6") else None

    def can_write(self, who) -> bool:
        name = f"/f-{who}-{uuid.uuid4().hex[:6]}"
        r = self.g.nfs_cp_to(self.c[who], self.payload, self.pseudo + name, host=self.host(who))
        if r.ok:
            back = self.g.nfs_cat(self.c[who], self.pseudo + name, host=self.host(who))
            assert back.ok and back.stdout == "written over nfs\n", str(back)
            return True
        assert r.rofs or r.denied, f"unexpected failure: {r}\n{self.g.log_tail()}"
        return False

    def level(self, who) -> str:
        """'rw', 'ro' or 'none', established by reading and writing."""
        ls = self.g.nfs_ls(self.c[who], self.pseudo, host=self.host(who))
        if not ls.ok:
            assert ls.denied, f"unexpected failure: {ls}\n{self.g.log_tail()}"
            return "none"
        assert "hello" in ls.stdout, str(ls)
        cat = self.g.nfs_cat(self.c[who], self.pseudo + "/hello", host=self.host(who))
        assert cat.ok and cat.stdout == "hello\n", str(cat)
        name = f"/f-{who}-{uuid.uuid4().hex[:6]}"
        cp = self.g.nfs_cp_to(self.c[who], self.payload, self.pseudo + name, host=self.host(who))
        if cp.ok:
            back = self.g.nfs_cat(self.c[who], self.pseudo + name, host=self.host(who))
            assert back.ok and back.stdout == "written over nfs\n", str(back)
            return "rw"
        assert cp.rofs, f"write failed but not with NFS4ERR_ROFS: {cp}"
        return "ro"

    def levels(self, *whos):
        return {w: self.level(w) for w in whos}


@pytest.fixture
def check(ganesha, by_name, payload):
    def make(share, helper):
        return Check(ganesha, by_name, share, helper, payload)
    return make


def active_ids(ganesha):
    out = ganesha.bus.busctl("--json=short", "call", "org.ganesha.nfsd",
                             "/org/ganesha/nfsd/ExportMgr", "org.ganesha.nfsd.exportmgr",
                             "ShowExports").stdout
    return {entry[0] for entry in json.loads(out)["data"][1]}


# --- access enforcement -----------------------------------------------------------
def test_levels_are_enforced_and_follow_changes(helper, fsroot, check):
    share, path = new_share(fsroot)
    ra, rb = rule(A4, "rw"), rule(B4, "ro")
    locs = helper.export(share, path, [ra, rb])
    assert locs == [f"10.71.0.1:/shares/{share.id}"]
    chk = check(share, helper)
    assert chk.levels("a", "b", "c") == {"a": "rw", "b": "ro", "c": "none"}
    # Data written by A is on the server's disk.
    assert any(n.startswith("f-a-") for n in os.listdir(path))

    # Deltas: B becomes rw (deny ro, allow rw), C gets ro, A is denied.
    rb_rw, rc = rule(B4, "rw"), rule(C4, "ro")
    helper.update_access(share, path, [rb_rw, rc], add_rules=[rb_rw, rc], delete_rules=[ra, rb])
    assert chk.levels("a", "b", "c") == {"a": "none", "b": "rw", "c": "ro"}

    # Recovery mode: exactly the given set (rules being denied are left out).
    helper.update_access(share, path, [rule(A4, "ro"), rule(B4, "rw", state="denying")], [], [])
    assert chk.levels("a", "b", "c") == {"a": "ro", "b": "none", "c": "none"}

    # Re-adding an applied rule and denying a never-applied one are no errors.
    helper.update_access(share, path, [], add_rules=[rule(A4, "ro")],
                         delete_rules=[rule("10.71.0.99", "rw"), rule("not-an-ip", "rw")])
    assert chk.levels("a", "b") == {"a": "ro", "b": "none"}


def test_squash_decides_who_owns_what_a_clients_root_writes(helper, fsroot, check):
    """libnfs runs as root in the client namespaces: with the default
    root_squash its files belong to the anonymous uid, with an explicit
    no_root_squash to root, with all_squash to the rule's anonuid/anongid.
    Where a network and a host inside it differ, the stricter squash wins."""
    share, path = new_share(fsroot)
    helper.export(share, path, [rule(A4, "rw"), rule(B4, "rw", squash="no_root_squash"),
                                rule(C4, "rw", squash="all_squash", anonuid=1234, anongid=4321)])
    chk = check(share, helper)

    def owner(who):
        before = set(os.listdir(path))
        assert chk.can_write(who)
        (new,) = [n for n in set(os.listdir(path)) - before if n.startswith(f"f-{who}-")]
        st = os.stat(os.path.join(path, new))
        return st.st_uid, st.st_gid
    assert owner("a") == (65534, 65534)
    assert owner("b") == (0, 0)
    assert owner("c") == (1234, 4321)
    helper.update_access(share, path, [rule("10.71.0.0/24", "rw", squash="no_root_squash"),
                                       rule(A4, "rw", squash="root_squash")], [], [])
    assert owner("a") == (65534, 65534) and owner("b") == (0, 0)


def test_every_accepted_form_reads_back_exactly(helper, fsroot, ganesha):
    """What ganesha's own parser makes of each rendered rule (DisplayExport)
    covers exactly the network that was granted: no form widens."""
    from sharedd.validation import ip_rule
    for form in ACCEPTED_FORMS:
        share, path = new_share(fsroot)
        canonical = ip_rule(form)
        helper.export(share, path, [rule(canonical, "ro")])
        out = ganesha.bus.busctl("--json=short", "call", "org.ganesha.nfsd",
                                 "/org/ganesha/nfsd/ExportMgr", "org.ganesha.nfsd.exportmgr",
                                 "DisplayExport", "q", str(helper.export_id(share))).stdout
        clients = [entry[0] for entry in json.loads(out)["data"][4]]
        assert addresses(clients) == addresses([canonical]), (form, clients)
        helper.unexport(share, path)


def test_cidr_rule_and_rw_wins(helper, fsroot, check):
    share, path = new_share(fsroot)
    helper.export(share, path, [rule("10.71.0.0/24", "ro"), rule(A4, "rw")])
    chk = check(share, helper)
    assert chk.levels("a", "b", "c") == {"a": "rw", "b": "ro", "c": "ro"}
    # IPv6-only client is outside an IPv4 CIDR.
    assert chk.level("d") == "none"
    helper.update_access(share, path, [rule("10.71.0.8/29", "rw")], [], [])
    # .11, .12, .13, .14 are in 10.71.0.8/29 (.8-.15)
    assert chk.levels("a", "c") == {"a": "rw", "c": "rw"}
    helper.update_access(share, path, [rule("10.71.0.12/30", "rw")], [], [])   # .12-.15
    assert chk.levels("a", "b", "c") == {"a": "none", "b": "rw", "c": "rw"}


def test_ipv6_rules(helper, fsroot, check):
    share, path = new_share(fsroot)
    helper.export(share, path, [rule(D6, "rw")])
    chk = check(share, helper)
    assert chk.levels("d", "a") == {"d": "rw", "a": "none"}
    helper.update_access(share, path, [rule("fd71::/64", "ro")], [], [])
    assert chk.levels("d", "a") == {"d": "ro", "a": "none"}
    # A /128 is written as the bare address.
    helper.update_access(share, path, [rule("fd71::21/128", "rw")], [], [])
    assert chk.level("d") == "rw"
    with open(helper._file(share.id)) as f:
        assert "Clients = fd71::21;" in f.read()
    # A dual-stack client is matched by the address it connects from.
    helper.update_access(share, path, [rule(E6, "rw"), rule(E4, "ro")], [], [])
    assert chk.levels("e6", "e", "d") == {"e6": "rw", "e": "ro", "d": "none"}


def test_everyone_rules_stay_within_their_family(helper, fsroot, check):
    share, path = new_share(fsroot)
    helper.export(share, path, [rule("0.0.0.0/0", "ro")])
    chk = check(share, helper)
    assert chk.levels("a", "c", "d") == {"a": "ro", "c": "ro", "d": "none"}
    helper.update_access(share, path, [rule("::/0", "rw")], [], [])
    assert chk.levels("a", "d") == {"a": "none", "d": "rw"}
    helper.update_access(share, path, [rule("::/0", "rw"), rule("0.0.0.0/0", "ro")], [], [])
    assert chk.levels("a", "d") == {"a": "ro", "d": "rw"}


def test_unexport_denies_everyone(helper, fsroot, check, ganesha):
    share, path = new_share(fsroot)
    helper.export(share, path, [rule(A4, "rw"), rule("fd71::/64", "ro")])
    chk = check(share, helper)
    eid = helper.export_id(share)
    assert eid in active_ids(ganesha)
    assert chk.levels("a", "d") == {"a": "rw", "d": "ro"}
    helper.unexport(share, path)
    assert chk.levels("a", "b", "d") == {"a": "none", "b": "none", "d": "none"}
    assert eid not in active_ids(ganesha)
    assert not os.path.exists(helper._file(share.id))
    helper.unexport(share, path)   # idempotent
    with pytest.raises(NotFound):
        helper.export_id(share)


def test_export_is_idempotent_and_updates(helper, fsroot, check, ganesha):
    share, path = new_share(fsroot)
    helper.export(share, path, [rule(A4, "ro")])
    eid = helper.export_id(share)
    chk = check(share, helper)
    assert chk.level("a") == "ro"
    helper.export(share, path, [rule(A4, "rw")])       # active: UpdateExport
    assert helper.export_id(share) == eid
    assert chk.levels("a", "b") == {"a": "rw", "b": "none"}
    helper.export(share, path, [])                     # no rules: nobody
    assert chk.level("a") == "none"
    assert eid in active_ids(ganesha)


# --- ids and files ----------------------------------------------------------------
def test_export_ids_are_free_ones_reused_and_bounded(make_helper, fsroot, ganesha):
    h = make_helper(ganesha_export_id_min=300, ganesha_export_id_max=302)
    shares = [new_share(fsroot) for _ in range(4)]
    for share, path in shares[:3]:
        h.export(share, path, [rule(A4, "rw")])
    assert [h.export_id(s) for s, _ in shares[:3]] == [300, 301, 302]
    before = sorted(os.listdir(h.state_dir))
    with pytest.raises(CapacityExceeded):
        h.export(*shares[3], [rule(A4, "rw")])
    assert sorted(os.listdir(h.state_dir)) == before        # nothing changed
    assert {300, 301, 302} <= active_ids(ganesha)
    h.unexport(*shares[1])
    h.export(*shares[3], [rule(A4, "rw")])
    assert h.export_id(shares[3][0]) == 301                 # the free one, reused
    assert h.exported_share_ids() == sorted([shares[0][0].id, shares[2][0].id, shares[3][0].id])


def test_allocation_skips_ids_ganesha_already_serves(make_helper, fsroot, ganesha):
    h1 = make_helper(ganesha_export_id_min=400, ganesha_export_id_max=401)
    h2 = make_helper(ganesha_export_id_min=400, ganesha_export_id_max=402)  # other state dir
    s1, p1 = new_share(fsroot)
    s2, p2 = new_share(fsroot)
    h1.export(s1, p1, [rule(A4, "rw")])
    h2.export(s2, p2, [rule(A4, "rw")])
    assert (h1.export_id(s1), h2.export_id(s2)) == (400, 401)
    # h3 learnt the ids in use before h4 took 403: AddExport tells it, the
    # id is left to its owner and the next one is used
    h3 = make_helper(ganesha_export_id_min=400, ganesha_export_id_max=405)
    h4 = make_helper(ganesha_export_id_min=400, ganesha_export_id_max=405)
    (s3, p3), (s4, p4), (s5, p5) = (new_share(fsroot) for _ in range(3))
    h3.export(s3, p3, [rule(A4, "rw")])
    h4.export(s4, p4, [rule(A4, "rw")])
    h3.export(s5, p5, [rule(A4, "rw")])
    assert (h3.export_id(s3), h4.export_id(s4), h3.export_id(s5)) == (402, 403, 404)
    out = ganesha.bus.busctl("--json=short", "call", "org.ganesha.nfsd",
                             "/org/ganesha/nfsd/ExportMgr", "org.ganesha.nfsd.exportmgr",
                             "ShowExports").stdout
    paths = {entry[0]: entry[1] for entry in json.loads(out)["data"][1]}
    assert (paths[403], paths[404]) == (p4, p5)      # h4's export left as it was


def test_export_id_options_cannot_exceed_uint16():
    opts = {o.name: o for o in GaneshaHelper.OPTIONS}
    assert opts["ganesha_export_id_max"].max == 65535
    assert opts["ganesha_export_id_min"].min == 1
    from sharedd.errors import ConfigError
    with pytest.raises(ConfigError):
        GaneshaHelper(_config(ganesha_export_id_min=10, ganesha_export_id_max=5), "/nonexistent")
    with pytest.raises(ConfigError):
        GaneshaHelper(_config(ganesha_export_id_max=70000), "/nonexistent")


def test_export_file_contents(helper, fsroot):
    share, path = new_share(fsroot)
    helper.export(share, path, [rule(B4, "ro"), rule(A4, "rw"), rule("fd71::/64", "ro")])
    files = os.listdir(helper.state_dir)
    assert f"{share.id}.conf" in files
    assert not [f for f in files if f.startswith(".") and not f.startswith(".lock")]   # no temp files left
    text = open(helper._file(share.id)).read()
    eid = helper.export_id(share)
    assert f"Export_Id = {eid};" in text
    assert f'Path = "{path}";' in text
    assert f'Pseudo = "/shares/{share.id}";' in text
    for line in ("Access_Type = None;", "Squash = Root_Squash;", "SecType = sys;",
                 "Transports = TCP;", "Name = VFS;"):
        assert line in text
    assert "No_Root_Squash" not in text
    rw = text.index("Access_Type = RW")
    ro = text.index("Access_Type = RO")
    assert rw < ro                                              # rw block first
    client_lines = [ln for ln in text.splitlines() if "CLIENT {" in ln]
    assert len(client_lines) == 2 and all("Protocols = 4;" in ln for ln in client_lines)
    assert all("Squash = Root_Squash; Anonymous_Uid = 65534; Anonymous_Gid = 65534;" in ln
               for ln in client_lines)
    assert "Clients = 10.71.0.11;" in client_lines[0]
    assert "Clients = 10.71.0.12, fd71::/64;" in client_lines[1]


def test_reexport_after_ganesha_restart(make_helper, fsroot, check, ganesha):
    h = make_helper()
    s1, p1 = new_share(fsroot)
    s2, p2 = new_share(fsroot)
    h.export(s1, p1, [rule(A4, "rw")])
    h.export(s2, p2, [rule(B4, "ro")])
    c1, c2 = check(s1, h), check(s2, h)
    assert (c1.level("a"), c2.level("b")) == ("rw", "ro")
    ids = {h.export_id(s1), h.export_id(s2)}
    old_pid = ganesha.pid
    ganesha.restart()
    assert ganesha.pid != old_pid
    assert not ids & active_ids(ganesha)                   # runtime exports vanished
    assert c1.level("a") == "none"
    assert h.reexport_all() == {s1.id: "added", s2.id: "added"}
    assert ids <= active_ids(ganesha)
    assert (c1.level("a"), c2.level("b"), c2.level("a")) == ("rw", "ro", "none")
    assert h.reexport_all() == {s1.id: "active", s2.id: "active"}
    # Per share, and export() after a restart (AddExport path) too.
    ganesha.restart()
    assert h.reexport(s1) is True
    assert h.reexport(s1) is False
    h.export(s2, p2, [rule(B4, "rw")])
    assert (c1.level("a"), c2.level("b")) == ("rw", "rw")


# --- bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("bad,error", [
    (rule("alice", "rw", access_type="user"), NotSupported),
    (rule("CN=x", "rw", access_type="cert"), NotSupported),
    (rule(A4, "admin"), NotSupported),
    (rule("10.71.0.5/24", "rw"), InvalidArgument),        # host bits set
    (rule("server.example", "rw"), InvalidArgument),
    (rule("10.71.0.1; Access_Type = RW", "rw"), InvalidArgument),
    (rule("fd71::/120", "rw"), NotSupported),              # ganesha cannot parse /1xx
    (rule("::ffff:10.71.0.11", "rw"), NotSupported),
    (rule("", "rw"), InvalidArgument),
])
def test_bad_rules_are_rejected_and_change_nothing(helper, fsroot, check, bad, error):
    share, path = new_share(fsroot)
    helper.export(share, path, [rule(A4, "rw")])
    before = open(helper._file(share.id)).read()
    with pytest.raises(error):
        helper.update_access(share, path, [rule(A4, "rw"), bad], [bad], [])
    with pytest.raises(error):
        helper.update_access(share, path, [rule(A4, "rw"), bad], [], [])
    with pytest.raises(error):
        helper.export(share, path, [bad])
    assert open(helper._file(share.id)).read() == before
    assert check(share, helper).level("a") == "rw"


def test_bad_share_ids_and_paths_are_rejected(helper, fsroot):
    share, path = new_share(fsroot)
    evil = Share(id="../x", name="x", backend="gh", protocol="NFS", size_gib=1, status="available")
    with pytest.raises(InvalidArgument):
        helper.export(evil, path, [])
    for bad_path in ("relative/dir", path + '"; Access_Type = RW; #', path + "\nCLIENT"):
        with pytest.raises(InvalidArgument):
            helper.export(share, bad_path, [])
    assert os.listdir(helper.state_dir) in ([], [".lock"])


def test_failed_add_leaves_no_file(helper, fsroot):
    share, _ = new_share(fsroot)
    with pytest.raises(BackendFailure):
        helper.export(share, os.path.join(fsroot, "does-not-exist"), [rule(A4, "rw")])
    assert not os.path.exists(helper._file(share.id))


# --- setup, locations, hints ----------------------------------------------------------
def test_setup_fails_clearly_without_ganesha(tmp_path, monkeypatch):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    h = GaneshaHelper(_config(), str(tmp_path / "state"))
    with pytest.raises(BackendFailure, match="org.ganesha.nfsd"):
        h.setup()


def test_setup_sees_ganesha(ganesha, tmp_path):
    h = GaneshaHelper(_config(), str(tmp_path / "state"))
    h.setup()
    assert os.path.isdir(h.state_dir)


def test_locations_and_hints_ipv4_and_ipv6(tmp_path):
    share = Share(id="abc123", name="n", backend="gh", protocol="NFS", size_gib=1, status="available")
    h4 = GaneshaHelper(_config(), str(tmp_path))
    assert h4.export_locations(share, "/x") == ["10.71.0.1:/shares/abc123"]
    hints = h4.mount_hints(share, "/x")
    assert hints["fstype"] == "nfs4" and hints["export"] == "10.71.0.1:/shares/abc123"
    assert "vers=4.1" in hints["options"]
    h6 = GaneshaHelper(_config(share_export_ip="fd71::1", ganesha_pseudo_prefix="/exp/nfs/"),
                       str(tmp_path))
    assert h6.export_locations(share, "/x") == ["[fd71::1]:/exp/nfs/abc123"]


def test_client_spec_forms(tmp_path):
    h = GaneshaHelper(_config(), str(tmp_path))
    assert h.client_spec("ip", "10.0.0.5") == ["10.0.0.5"]
    assert h.client_spec("ip", "10.0.0.5/32") == ["10.0.0.5"]
    assert h.client_spec("ip", "10.0.0.0/24") == ["10.0.0.0/24"]
    assert h.client_spec("ip", "0.0.0.0/0") == ["0.0.0.0/1", "128.0.0.0/1"]
    assert h.client_spec("ip", "::/0") == ["::/1", "8000::/1"]
    assert h.client_spec("ip", "fd00::5") == ["fd00::5"]
    assert h.client_spec("ip", "fd00::5/128") == ["fd00::5"]
    assert h.client_spec("ip", "fd00::/64") == ["fd00::/64"]
    assert h.client_spec("ip", "fd00::/99") == ["fd00::/99"]
    with pytest.raises(NotSupported):
        h.client_spec("ip", "fd00::/100")


# --- quirk handling, with a scripted busctl (beside the real tests above) ---------------
FAKE_BUSCTL = """#!/usr/bin/python3
import json, os, sys
state = os.environ["FAKE_BUSCTL_STATE"]
with open(state) as f:
    st = json.load(f)
args = [a for a in sys.argv[1:] if not a.startswith("--")]
method = args[4] if len(args) > 4 and args[0] == "call" else "?"
st["calls"].append(method)
script = st["script"].get(method, [])
reply = script.pop(0) if script else st["default"].get(method, [0, "", ""])
with open(state, "w") as f:
    json.dump(st, f)
rc, out, err = reply
sys.stdout.write(out)
sys.stderr.write(err)
sys.exit(rc)
"""

SHOW_EMPTY = [0, '{"type":"(tt)a(qs((sb)(sb)(sb)(sb)(sb)(sb)(sb)(sb))(tt))","data":[[0,0],[]]}', ""]


@pytest.fixture
def fake_busctl(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "busctl").write_text(FAKE_BUSCTL)
    (bindir / "busctl").chmod(0o755)
    state = tmp_path / "busctl.json"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_BUSCTL_STATE", str(state))
    monkeypatch.setattr("sharedd.helpers.ganesha._BUSY_DELAY", 0.01)

    def program(script=None, default=None):
        st = {"calls": [], "script": script or {},
              "default": dict({"ShowExports": SHOW_EMPTY}, **(default or {}))}
        state.write_text(json.dumps(st))

    def calls():
        return json.loads(state.read_text())["calls"]

    program()
    return program, calls


def _plain_share(tmp_path):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    return Share("q1", "q1", "gh", "NFS", 1, "available"), str(d)


def test_busy_is_retried(fake_busctl, tmp_path):
    program, calls = fake_busctl
    program(script={"RemoveExport": [[1, "", "Call failed: Export busy"]] * 2})
    h = GaneshaHelper(_config(), str(tmp_path / "st"))
    share, path = _plain_share(tmp_path)
    h.export(share, path, [rule(A4, "rw")])
    h.unexport(share, path)
    assert calls().count("RemoveExport") == 3
    assert not os.path.exists(h._file(share.id))


def test_errors_found_in_a_success_reply_is_a_failure(fake_busctl, tmp_path):
    program, calls = fake_busctl
    program(script={"AddExport": [[0, 's "1 exports added. Errors found: Syntax error"', ""]]})
    h = GaneshaHelper(_config(), str(tmp_path / "st"))
    share, path = _plain_share(tmp_path)
    with pytest.raises(BackendFailure, match="Errors found"):
        h.export(share, path, [rule(A4, "rw")])
    assert calls() == ["ShowExports", "AddExport", "RemoveExport"]   # taken down again
    assert not os.path.exists(h._file(share.id))


def test_add_on_an_active_id_tries_another(fake_busctl, tmp_path):
    program, calls = fake_busctl
    taken = [1, "", "Call failed: Selected entries in x already active!!!"]
    program(script={"AddExport": [taken]})
    h = GaneshaHelper(_config(), str(tmp_path / "st"))
    share, path = _plain_share(tmp_path)
    h.export(share, path, [rule(A4, "rw")])
    assert calls() == ["ShowExports", "AddExport", "AddExport"]   # never an update of it
    assert h.export_id(share) == h.id_min + 1
    h.unexport(share, path)
    program(default={"AddExport": taken})      # every id taken: a clear failure, no file
    with pytest.raises(BackendFailure, match="already active"):
        h.export(share, path, [rule(A4, "rw")])
    assert not os.path.exists(h._file(share.id))


def test_remove_of_unknown_id_is_tolerated(fake_busctl, tmp_path):
    program, calls = fake_busctl
    h = GaneshaHelper(_config(), str(tmp_path / "st"))
    share, path = _plain_share(tmp_path)
    h.export(share, path, [rule(A4, "rw")])
    program(default={"RemoveExport": [1, "", "Call failed: lookup_export failed with Export id not found"]})
    h.unexport(share, path)
    assert not os.path.exists(h._file(share.id))
    program(default={"RemoveExport": [1, "", "Call failed: Access denied"]})
    h.export(share, path, [rule(A4, "rw")])
    with pytest.raises(BackendFailure, match="Access denied"):
        h.unexport(share, path)
    assert os.path.exists(h._file(share.id))   # still exported: keep its file


def test_failed_update_restores_the_previous_file(fake_busctl, tmp_path):
    program, calls = fake_busctl
    h = GaneshaHelper(_config(), str(tmp_path / "st"))
    share, path = _plain_share(tmp_path)
    h.export(share, path, [rule(A4, "rw")])
    before = open(h._file(share.id)).read()
    active = [0, '{"type":"x","data":[[0,0],[[%d,"%s",[],[0,0]]]]}' % (h.export_id(share), path), ""]
    program(script={"UpdateExport": [[1, "", "Call failed: boom"]]},
            default={"ShowExports": active})
    with pytest.raises(BackendFailure, match="boom"):
        h.update_access(share, path, [rule(B4, "ro")], [], [])
    assert open(h._file(share.id)).read() == before
    assert calls() == ["UpdateExport", "UpdateExport"]   # old one put back (no listing needed)
