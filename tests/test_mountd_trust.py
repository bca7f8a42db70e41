"""Signed records: what mountd believes, and what it refuses.

- sharedd.signing on its own: canonical form, tampering, keys on disk;
- RecordSource: replay protection (rolled-back spool, an old epoch put
  back), persisted across a restart;
- the real sharedd-mountd process with a trusted key and a mount(8) that
  counts its calls: a corpus of unsigned, forged, re-keyed, cross-host,
  replayed and malformed records causes no mount attempt; one genuine
  signed grant does.
"""

import json
import os
import pathlib
import re
import stat
import time

import pytest

from mountd.records import RecordSource
from mountd.trust import Trust, Untrusted, load_keys
from sharedd import record as recordlib
from sharedd import signing
from sharedd.errors import ConfigError
from tests.fixtures.mountd_env import (CLIENT4, HOST, SERVER4, make_record, make_share,
                                       new_key, rule, signed, write_record)
from tests.test_mountd_daemon import Mountd, wait_state


# --- the signature itself ------------------------------------------------------

def test_a_signature_covers_every_field_and_survives_any_layout():
    key = new_key()
    share = make_share(rules=[rule(CLIENT4)])
    rec = signed(key, make_record(5, "post", "allow_access", share=share))
    key.public.verify(rec)
    # The spool's layout, parsed back, verifies the same.
    key.public.verify(recordlib.loads(recordlib.dumps(rec)))
    for change in ({"seq": 6}, {"epoch": "8" * 32}, {"server_addresses": ["10.66.0.1"]},
                   {"share": dict(share, name="other")}):
        with pytest.raises(signing.SignatureError):
            key.public.verify(dict(rec, **change))
    with pytest.raises(signing.SignatureError, match="not signed"):
        key.public.verify({k: v for k, v in rec.items() if k != "signature"})
    with pytest.raises(signing.SignatureError, match="key"):
        new_key().public.verify(rec)            # same host id, another key


def test_key_files_are_made_once_private_and_refused_when_loose(tmp_path):
    path = str(tmp_path / "k.key")
    key, created = signing.SigningKey.generate(path, "h1")
    assert created and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, created = signing.SigningKey.generate(path, "h1")
    assert not created and again.public == key.public      # never replaced
    assert signing.parse_public_line(key.public.line()) == key.public
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="too open"):
        signing.SigningKey.load(path, "h1")
    os.chmod(path, 0o600)
    os.symlink(path, str(tmp_path / "link.key"))
    with pytest.raises(ConfigError, match="cannot open"):
        signing.SigningKey.load(str(tmp_path / "link.key"), "h1")


def test_trusted_keys_from_options_and_a_directory(tmp_path):
    a, b = new_key("a1"), new_key("b1")
    d = tmp_path / "keys"
    d.mkdir(mode=0o755)
    (d / "b1.pub").write_text(b.public.line() + "\n")
    keys = load_keys([a.public.inline()], str(d), "conf: trusted_keys", "conf: trusted_keys_dir")
    assert keys == {"a1": a.public, "b1": b.public}
    (d / "x.pub").write_text(new_key("b1").public.line())
    with pytest.raises(ConfigError, match="second, different key for host b1"):
        load_keys([], str(d), "w", "w")
    (d / "x.pub").write_text("ssh-ed25519 AAAA b1")
    with pytest.raises(ConfigError, match="x.pub"):
        load_keys([], str(d), "w", "w")
    (d / "x.pub").unlink()
    os.chmod(d, 0o777)
    with pytest.raises(ConfigError, match="writable by root alone"):
        load_keys([], str(d), "w", "w")


def test_exports_must_be_on_a_declared_address():
    key = new_key()
    trust = Trust({HOST: key.public}, accept_unsigned=False)
    good = make_share(rules=[rule(CLIENT4)])
    trust.check(signed(key, make_record(1, "post", "allow_access", share=good)))
    evil = make_share(rules=[rule(CLIENT4)], export="10.66.0.1:/steal")
    with pytest.raises(Untrusted, match="not on an address the server declares"):
        trust.check(signed(key, make_record(2, "post", "allow_access", share=evil)))
    with pytest.raises(Untrusted, match="declares"):
        trust.check(signed(key, make_record(3, "periodic", shares=[good, evil])))
    with pytest.raises(Untrusted, match="no trusted key for host"):
        trust.check(make_record(4, "post", "allow_access", share=good, host="storage75"))


# --- replay --------------------------------------------------------------------

def test_a_rolled_back_spool_or_an_old_epoch_changes_nothing(tmp_path):
    key = new_key()
    spool, state = str(tmp_path / "spool"), str(tmp_path / "state")
    trust = Trust({HOST: key.public}, accept_unsigned=False)
    share = make_share(rules=[rule(CLIENT4, "rw")])
    write_record(spool, signed(key, make_record(1, "periodic", shares=[share], second=100)))
    denied = dict(share, access_rules=[])
    write_record(spool, signed(key, make_record(2, "post", "deny_access", share=denied,
                                                second=101)))
    src = RecordSource(spool, (0,), trust, state)
    assert src.scan()[HOST][share["id"]]["access_rules"] == []
    # The deny record is removed: the spool now ends before what was applied.
    os.unlink(os.path.join(spool, HOST, recordlib.file_name(make_record(2, "post", "deny_access",
                                                                         share=denied))))
    assert src.scan()[HOST][share["id"]]["access_rules"] == []      # last verified state
    assert "rolled back" in src.unavailable()[HOST]
    # The same after a restart (the applied mark is on disk), with no state in memory.
    again = RecordSource(spool, (0,), trust, state)
    assert HOST not in again.scan() and "rolled back" in again.unavailable()[HOST]
    # Genuine records of an older epoch put back (timestamps before the
    # applied one) are ignored, even with a higher seq.
    fresh = str(tmp_path / "spool2")
    write_record(fresh, signed(key, make_record(7, "periodic", shares=[], second=200)))
    src = RecordSource(fresh, (0,), trust, str(tmp_path / "state2"))
    assert src.scan()[HOST] == {}
    old = signed(key, make_record(50, "periodic", shares=[share], epoch="6" * 32, second=150))
    write_record(fresh, old)
    assert src.scan()[HOST] == {} and src.rejected == 1
    # A new epoch that is newer is sharedd's recreated database: it counts.
    new = signed(key, make_record(1, "periodic", shares=[share], epoch="8" * 32, second=300))
    write_record(fresh, new)
    assert share["id"] in src.scan()[HOST]


# --- the daemon against a corpus ------------------------------------------------

def _counting_mount(tmp):
    bindir = os.path.join(tmp, "bin")
    os.makedirs(bindir)
    calls = os.path.join(tmp, "mount-calls")
    script = os.path.join(bindir, "mount")
    pathlib.Path(script).write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 32\n')
    os.chmod(script, 0o755)
    return bindir, calls


def _raw(spool, host, name, data: bytes, mode=0o644):
    d = os.path.join(spool, host)
    os.makedirs(d, mode=0o755, exist_ok=True)
    path = os.path.join(d, name)
    tmp = os.path.join(d, "." + name)
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.rename(tmp, path)


def _calls(path):
    try:
        return pathlib.Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def test_no_mount_attempt_from_anything_but_a_genuine_current_record(mountd_tmp):
    key, rogue, other = new_key(), new_key(), new_key("storage75")
    bindir, calls = _counting_mount(mountd_tmp)
    d = Mountd(mountd_tmp, None, args=("--no-bus",), interval=60,
               extra=f"trusted_keys = {key.public.inline()}\n",
               env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    spool = d.spool
    try:
        quiet = make_share(name="quiet", rules=[rule("10.74.0.99")])
        write_record(spool, signed(key, make_record(10, "periodic", shares=[quiet], second=110)))
        d.wait_notify("READY=1")
        target = make_share(name="target", rules=[rule(CLIENT4, "rw")])

        def rec(seq, **kw):
            kw.setdefault("second", 100 + seq)
            return make_record(seq, "post", "allow_access", share=kw.pop("share", target), **kw)
        corpus = []
        corpus.append(rec(11))                                      # unsigned
        corpus.append(signed(rogue, rec(12)))                       # re-keyed: another key, same host
        tampered = signed(key, rec(13, share=quiet))
        tampered["share"] = target                                  # genuine signature, other content
        corpus.append(tampered)
        corpus.append(signed(other, rec(14)))                       # another host's key
        corpus.append(rec(1, epoch="8" * 32, second=3000))          # the forged-epoch record
        corpus.append(signed(key, rec(60, epoch="6" * 32, second=50)))   # an old epoch replayed
        corpus.append(signed(key, rec(15, share=make_share(name="evil", rules=[rule(CLIENT4)],
                                                            export="10.66.0.1:/steal"))))
        for r in corpus:
            write_record(spool, r)
        # another host's genuine record, in its own directory: no key for it
        write_record(spool, signed(other, make_record(3, "post", "allow_access", share=target,
                                                      host="storage75")))
        # genuine, but group-writable
        loose = signed(key, rec(16))
        _raw(spool, HOST, recordlib.file_name(loose), recordlib.dumps(loose), 0o664)
        # genuine record with a key given twice (a parser keeping the last one
        # would read the forged one)
        dup = signed(key, rec(17, share=quiet))
        text = recordlib.dumps(dup).decode().replace(
            '"share": {', '"share": ' + json.dumps(target) + ', "share": {', 1)
        _raw(spool, HOST, recordlib.file_name(dup), text.encode())
        # full-width digits in the timestamp
        wide = signed(key, rec(18))
        text = recordlib.dumps(wide).decode().replace(wide["timestamp"][:4], "２０２６")
        _raw(spool, HOST, recordlib.file_name(wide), text.encode())
        expected = len(corpus) + 4
        deadline = time.monotonic() + 20
        while True:
            text = d.text()
            n = len(re.findall(r"spool file rejected|spool file \S+ of host \S+ ignored", text))
            if n >= expected:
                break
            assert time.monotonic() < deadline, f"{n} of {expected} rejections logged:\n{text}"
            time.sleep(0.1)
        time.sleep(0.5)
        assert _calls(calls) == [], "no record of the corpus may cause a mount attempt"
        for why in ("is not signed", "not by storage74's trusted key", "does not verify",
                    "no trusted key for host 'storage75'", "older than the applied epoch",
                    "not on an address the server declares", "writable by group or others",
                    "appears twice", "does not match"):
            assert why in text, why
        # One genuine, current, signed grant: now mountd tries to mount it.
        write_record(spool, signed(key, rec(19)))
        wait_state(mountd_tmp, lambda st: target["id"] in st, 10)
        deadline = time.monotonic() + 10
        while not _calls(calls):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert all(f"{SERVER4}:/shares/target" in c for c in _calls(calls))
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("to", ["010.74.0.11", "10.74.0.11/16", " 10.74.0.11", "１０.74.0.11",
                                "10.74.0.0/24 ", "::ffff:10.74.0.11", "0.0.0.0"])
def test_records_carry_addresses_only_in_sharedds_own_form(to):
    share = make_share(rules=[rule(CLIENT4)])
    share["access_rules"][0]["access_to"] = to
    with pytest.raises(recordlib.RecordError, match="access_to"):
        make_record(5, "post", "allow_access", share=share)


def test_a_record_rewritten_with_its_old_mtime_is_read_again(tmp_path):
    spool = str(tmp_path)
    share = make_share(rules=[rule(CLIENT4, "rw")])
    path = write_record(spool, make_record(1, "periodic", shares=[share]))
    src = RecordSource(spool, (0,))
    assert src.scan()[HOST][share["id"]]["access_rules"][0]["access_level"] == "rw"
    st = os.stat(path)
    ro = dict(share, access_rules=[rule(CLIENT4, "ro")])
    data = recordlib.dumps(make_record(1, "periodic", shares=[ro]))
    assert len(data) == st.st_size          # same size, same inode, same mtime
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert src.scan()[HOST][share["id"]]["access_rules"][0]["access_level"] == "ro"
