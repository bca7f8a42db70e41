"""mountd's desired state: folding hook records (golden examples and records
built with the schema) into the mounts this host wants."""

import json
import pathlib


from mountd.reconcile import Identity, desired_mounts, fold
from mountd.records import RecordSource
from sharedd import record as recordlib
from tests.fixtures.mountd_env import (CLIENT4, CLIENT6, HOST, SERVER4, make_record, make_share,
                                       rule, write_record)

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "schema" / "examples"
GOLDEN = ["post-create_share", "pre-allow_access", "post-allow_access", "periodic",
          "pre-deny_access", "post-deny_access", "pre-delete_share",
          "post-allow_access-cert", "post-extend_share-failed"]
PROJECTS = "6f1d2c3b4a5948372615049382716051"
VOL1 = "a0b1c2d3e4f5461788990a1b2c3d4e5f"
EXTRA = {"NFS": [], "GLUSTERFS": []}


def golden():
    recs = [recordlib.validate(json.loads((EXAMPLES / f"{n}.json").read_text())) for n in GOLDEN]
    return sorted(recs, key=lambda r: r["seq"])


def want(shares, addrs=("10.71.0.11",), cn=None, protocols=("NFS", "GLUSTERFS"), cert=True):
    d = desired_mounts({"h": shares}, Identity(tuple(addrs), cn), protocols, EXTRA, cert)
    return {sid: (x.level, x.error) for sid, x in d.items()}


def test_golden_story_step_by_step():
    recs = golden()
    by_seq = {r["seq"]: r for r in recs}
    upto = lambda n: [r for r in recs if r["seq"] <= n]
    # Created, no rules: nothing to mount.
    assert want(fold(upto(38))[1]) == {}
    # pre allow: the new rw rule is only 'applying'; the ro CIDR rule is active.
    assert want(fold(upto(41))[1]) == {PROJECTS: ("ro", "")}
    # post allow: rw is active now and wins over ro.
    assert want(fold(upto(42))[1]) == {PROJECTS: ("rw", "")}
    # Deny arrives in the pre record: back to ro before access disappears.
    assert want(fold(upto(44))[1])[PROJECTS] == ("ro", "")
    assert want(fold(upto(45))[1])[PROJECTS] == ("ro", "")
    # Another client in the CIDR but not the rw address: ro throughout.
    assert want(fold(upto(42))[1], addrs=("10.71.0.99",)) == {PROJECTS: ("ro", "")}
    # An address outside every rule: nothing.
    assert want(fold(recs)[1], addrs=("10.71.1.5",)) == {}
    assert by_seq[46]["share"]["status"] == "deleting"


def test_golden_final_state():
    epoch, shares = fold(golden())
    assert epoch == golden()[0]["epoch"]
    deleted = golden()[6]["share"]["id"]
    assert deleted not in shares                       # pre delete_share
    assert set(shares) == {PROJECTS, VOL1}
    assert shares[PROJECTS]["status"] == "error"       # failed extend keeps the share
    # cert rules: client1 rw, client2 ro (post allow_access cert)
    assert want(shares, addrs=(), cn="client1.example.org") == {VOL1: ("rw", "")}
    assert want(shares, addrs=(), cn="client2.example.org") == {VOL1: ("ro", "")}
    # GLUSTERFS not among the protocols: not wanted; no client cert: an error to report.
    assert want(shares, addrs=(), cn="client1.example.org", protocols=("NFS",)) == {}
    level, error = want(shares, addrs=(), cn="client1.example.org", cert=False)[VOL1]
    assert "client certificate" in error


def test_record_order_in_input_does_not_matter():
    recs = golden()
    assert fold(list(reversed(recs)))[1] == fold(recs)[1]


def test_deleted_share_in_ipv6_backend_before_deletion():
    recs = golden()
    deleting = recs[6]["share"]
    before = [r for r in recs if r["seq"] < 46]
    shares = fold(before + [make_record(45, "post", "allow_access",
                                        share=dict(deleting, status="available"),
                                        epoch=recs[0]["epoch"], host="storage1",
                                        backend="fast", second=100)])[1]
    assert want(shares, addrs=("fd71::11",))[deleting["id"]] == ("rw", "")
    assert deleting["id"] not in fold(recs)[1]


def test_convergence_from_a_later_periodic_after_missed_events():
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    b = make_share(name="beta", rules=[rule("10.74.0.0/24", "ro")])
    p10 = make_record(10, "periodic", shares=[a, b])
    # Missed: seq 11..19 (rw denied on alpha, beta deleted, gamma created).
    a_later = dict(a, access_rules=[rule("10.74.0.0/24", "ro")])
    c = make_share(name="gamma", rules=[rule(CLIENT6, "rw")])
    p20 = make_record(20, "periodic", shares=[a_later, c])
    assert want(fold([p10])[1], addrs=(CLIENT4, CLIENT6)) == {a["id"]: ("rw", ""), b["id"]: ("ro", "")}
    assert want(fold([p10, p20])[1], addrs=(CLIENT4, CLIENT6)) == {
        a["id"]: ("ro", ""), c["id"]: ("rw", "")}


def test_records_older_than_the_periodic_are_ignored_but_newer_apply():
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    stale = make_record(5, "post", "allow_access", share=make_share(name="stale", rules=[rule(CLIENT4)]))
    p10 = make_record(10, "periodic", shares=[a])
    deny = make_record(11, "pre", "deny_access",
                       share=dict(a, access_rules=[dict(a["access_rules"][0], state="denying")]))
    assert want(fold([stale, p10])[1], addrs=(CLIENT4,)) == {a["id"]: ("rw", "")}
    assert want(fold([stale, p10, deny])[1], addrs=(CLIENT4,)) == {}


def test_periodic_of_one_backend_does_not_reset_another():
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")], backend="main")
    z = make_share(name="zeta", rules=[rule(CLIENT4, "ro")], backend="other")
    ev = make_record(3, "post", "allow_access", share=z, backend="other")
    p = make_record(10, "periodic", shares=[a], backend="main")
    assert set(fold([ev, p])[1]) == {a["id"], z["id"]}


def test_epoch_change_resets_the_host_state():
    old = "1" * 32
    new = "2" * 32
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    b = make_share(name="beta", rules=[rule(CLIENT4, "ro")])
    old_recs = [make_record(50, "periodic", shares=[a], epoch=old, second=50),
                make_record(51, "post", "allow_access", share=b, epoch=old, second=51)]
    # Database recreated: seq restarts at 1, later in time.
    new_recs = [make_record(1, "post", "create_share",
                            share=make_share(name="fresh", rules=[]), epoch=new, second=100)]
    epoch, shares = fold(old_recs + new_recs)
    assert epoch == new
    assert want(shares, addrs=(CLIENT4,)) == {}
    assert want(fold(old_recs)[1], addrs=(CLIENT4,)) == {a["id"]: ("rw", ""), b["id"]: ("ro", "")}


def test_bad_export_or_option_is_reported_not_mounted():
    bad_opt = make_share(name="o", rules=[rule(CLIENT4)],
                         hints={"fstype": "nfs4", "export": "10.74.0.1:/x", "options": ["suid"]})
    no_export = make_share(name="e", rules=[rule(CLIENT4)], hints={"fstype": "nfs4"},
                           export="10.74.0.1:/x")
    no_export["export_locations"] = ["-o suid 10.74.0.1:/x"]
    cifs = make_share(name="c", rules=[rule(CLIENT4)], protocol="CIFS",
                      hints={"fstype": "cifs", "export": "10.74.0.1:/c"})
    got = want({s["id"]: s for s in (bad_opt, no_export, cifs)}, addrs=(CLIENT4,),
               protocols=("NFS", "GLUSTERFS"))
    assert "not allowed" in got[bad_opt["id"]][1]
    assert "export" in got[no_export["id"]][1]
    assert cifs["id"] not in got


def test_record_source_reads_spool_and_bus_records(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o755)
    recs = golden()
    for r in recs:
        write_record(str(spool), r)
    src = RecordSource(str(spool), (0,))
    shares = src.scan()["storage1"]
    assert shares == fold(recs)[1]
    # A record from the bus alone (no spool file) counts the same way.
    a = make_share(name="bus", rules=[rule("10.71.0.11")])
    src.add_bus_record(make_record(49, "post", "allow_access", share=a, host="storage1",
                                   epoch=recs[0]["epoch"], second=3600))
    assert a["id"] in src.scan()["storage1"]
    # Superseded spool records are not kept in memory, but still not re-read.
    host = src.hosts["storage1"]
    assert all(f.record is None for f in host.files.values() if f.view and f.view["seq"] < 43)
    assert src.scan()["storage1"] == dict(fold(recs)[1], **{a["id"]: dict(a, backend="main")})


def test_record_source_new_epoch_in_spool(tmp_path):
    spool = str(tmp_path)
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    write_record(spool, make_record(7, "periodic", shares=[a], epoch="1" * 32, second=10))
    src = RecordSource(spool, (0,))
    assert a["id"] in src.scan()[HOST]
    write_record(spool, make_record(1, "post", "create_share", share=make_share(name="n"),
                                    epoch="2" * 32, second=20))
    assert a["id"] not in src.scan()[HOST]


def test_a_granted_snapshot_is_mounted_read_only_on_its_own_mount_point():
    """A share's exported snapshots (mountable snapshots) are wanted, each
    read-only whatever its rule says, named <share>@<snapshot>, by their
    own rules only; a record that drops the snapshot drops the mount."""
    share = make_share(name="projects", rules=[rule("10.71.0.99")])
    snap = {"id": "5" * 32, "name": "nightly",
            "export_locations": [f"{SERVER4}:/shares/{'5' * 32}"],
            "access_rules": [rule("10.71.0.11", level="rw")],
            "mount_hints": {"fstype": "nfs4", "export": f"{SERVER4}:/shares/{'5' * 32}",
                            "options": ["vers=4.1"]}}
    share["snapshots"] = [snap]
    rec = recordlib.validate(make_record(1, method="snapshot_update_access", share=share))
    d = desired_mounts({"h": fold([rec])[1]}, Identity(("10.71.0.11",)), ("NFS",), EXTRA, True)
    assert set(d) == {snap["id"]}, "the share's own rule is for another host"
    mine = d[snap["id"]]
    assert (mine.level, mine.share_name, mine.export, mine.error) == \
        ("ro", "projects@nightly", f"{SERVER4}:/shares/{'5' * 32}", "")
    # the share's own grant does not reach its snapshots
    assert set(want(fold([rec])[1], addrs=("10.71.0.99",))) == {share["id"]}
    # denied: the next record of the share has no snapshots
    gone = dict(share)
    del gone["snapshots"]
    later = recordlib.validate(make_record(2, method="snapshot_update_access", share=gone))
    assert want(fold([rec, later])[1]) == {}


def test_a_share_two_hosts_announce_stays_where_it_is_mounted(caplog):
    """A trusted host that was broken into may sign a record naming another
    host's share (its id and name, its own export): the share stays with the
    host it is mounted from, and is mounted from neither if it is not
    mounted yet; said once, not every pass."""
    import logging
    theirs = make_share(name="data", rules=[rule(CLIENT4, "rw")], export=f"{SERVER4}:/data")
    forged = dict(make_share(theirs["id"], name="data", rules=[rule(CLIENT4, "rw")],
                             export="10.66.0.1:/steal"))
    other = make_share(name="other", rules=[rule(CLIENT4, "ro")])
    by_host = {"aaa-evil": {theirs["id"]: forged}, "bbb": {theirs["id"]: theirs,
                                                            other["id"]: other}}
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            none = desired_mounts(by_host, Identity((CLIENT4,)), ("NFS",), EXTRA, False)
            kept = desired_mounts(by_host, Identity((CLIENT4,)), ("NFS",), EXTRA, False,
                                  owners={theirs["id"]: "bbb"})
    assert set(none) == {other["id"]}
    assert kept[theirs["id"]].host == "bbb" and kept[theirs["id"]].export == f"{SERVER4}:/data"
    said = [r.getMessage() for r in caplog.records if "announced by 2" in r.getMessage()]
    assert len(said) == 2 and "mounted from none" in said[0] and "bbb" in said[1], said
    # the host it is mounted from withdraws this host's access: the other
    # does not get the mount point
    by_host["bbb"][theirs["id"]] = dict(theirs, access_rules=[])
    left = desired_mounts(by_host, Identity((CLIENT4,)), ("NFS",), EXTRA, False,
                          owners={theirs["id"]: "bbb"})
    assert set(left) == {other["id"]}
