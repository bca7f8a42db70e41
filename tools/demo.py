"""The sharedd demo (run through tools/demo).

A storage host and client hosts as network namespaces (no route out), a
private system bus, NFS-Ganesha in the storage namespace, and sharedd on its
embedded default backend (btrfs on a pool image it creates). Every step is
a busctl command, printed with its answer. Everything is torn down at the end.
It reuses the environment code of the test suite (tests/fixtures), which the
tests prove.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sharedd import signing  # noqa: E402
from tests.fixtures.bus import Bus, _bus_config  # noqa: E402
from tests.fixtures.ganesha import make_ganesha  # noqa: E402
from tests.fixtures.netlab import make_lab  # noqa: E402
from tests.fixtures.storage_host import destroy_storage_host, make_storage_host  # noqa: E402

BOLD, DIM, END = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")
SUBNET4, SUBNET6 = "10.79.0.0/24", "fd79::/64"


def say(text):
    print(f"\n{BOLD}== {text}{END}")


def run(argv, env=None, show=True, ns=None, check=True):
    shown = " ".join(shlex.quote(a) for a in argv)
    if ns:
        shown = f"[client {ns}] {shown}"
    if show:
        print(f"{DIM}${END} {shown}")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    out = (proc.stdout + proc.stderr).strip()
    if show and out:
        print(textwrap.indent(out[:3000], "  "))
    if check and proc.returncode != 0:
        raise SystemExit(f"demo step failed: {shown}\n{out}")
    return proc


def main():
    tmp = tempfile.mkdtemp(prefix="sharedd-demo-")
    os.chmod(tmp, 0o755)
    conf = _bus_config(tmp)
    out = subprocess.run(["dbus-daemon", f"--config-file={conf}", "--fork", "--print-address=1",
                          "--print-pid=1"], capture_output=True, text=True, check=True).stdout.split()
    bus = Bus(out[0], int(out[1]), tmp)
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    env = dict(os.environ)
    host = None
    try:
        with make_lab(SUBNET4, SUBNET6) as lab, make_ganesha(lab, bus) as ganesha:
            say(f"a private system bus ({bus.address}), a storage host at {lab.server_ip4} "
                "running NFS-Ganesha, three client hosts")
            alice = lab.add_client("alice", ip4="10.79.0.11")
            bob = lab.add_client("bob", ip4="10.79.0.12")
            eve = lab.add_client("eve", ip4="10.79.0.13")
            print("  clients: alice 10.79.0.11, bob 10.79.0.12, eve 10.79.0.13")
            host = make_storage_host(bus, lab, ganesha, tmp)
            say("sharedd on the btrfs backend (it creates, formats and loop-mounts its pool image)")
            print(textwrap.indent(open(host.config_path).read().strip(), "  "))
            host.start()
            print("  sharedd sent READY=1 (sd_notify) after taking org.sharedd.Sharedd1")
            B = ["busctl", "--system", "call", "org.sharedd.Sharedd1"]
            M = ["/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager"]
            S = "org.sharedd.Sharedd1.Share"

            def call(*args, check=True):
                return run(B + list(args), env=env, check=check)

            def share_path(proc):
                return proc.stdout.split('"')[1]

            say("create a 1 GiB NFS share")
            p = share_path(call(*M, "CreateShare", "ssta{sv}", "projects", "NFS", "1", "0"))
            run(["busctl", "--system", "get-property", "org.sharedd.Sharedd1", p, S,
                 "Status", "SizeGiB", "ExportLocations"], env=env)
            loc = host.share_prop(p, "ExportLocations")[0]
            pseudo = loc.split(":", 1)[1]

            def probe(name, ns):
                ls = ganesha.nfs_ls(ns, pseudo)
                if not ls.ok:
                    why = ls.output.strip().splitlines()[-1][:300] if ls.output.strip() else "denied"
                    return f"{name}: no access ({why})"
                f = os.path.join(tmp, f"{name}.txt")
                open(f, "w").write(f"written by {name}\n")
                w = ganesha.nfs_cp_to(ns, f, f"{pseudo}/{name}.txt")
                why = "read-only file system" if w.rofs else w.output.strip()[:300]
                return f"{name}: can list; write {'OK' if w.ok else 'refused: ' + why}"

            def probe_all():
                for name, ns in (("alice", alice), ("bob", bob), ("eve", eve)):
                    print(f"  nfs-ls/nfs-cp from {probe(name, ns)}")

            say("no rule yet: nobody gets in (real NFS clients, libnfs)")
            probe_all()
            say("grant alice rw and bob ro")
            rid = call(p, S, "AllowAccess", "sssa{sv}", "ip", "10.79.0.11", "rw", "0").stdout.split('"')[1]
            call(p, S, "AllowAccess", "sssa{sv}", "ip", "10.79.0.12", "ro", "0")
            run(["busctl", "--system", "get-property", "org.sharedd.Sharedd1", p, S, "AccessRules"], env=env)
            probe_all()
            say("a bad rule is refused with a named error and changes nothing")
            run(["busctl", "--system", "call", "org.sharedd.Sharedd1", p, S,
                 "AllowAccess", "sssa{sv}", "ip", "10.79.0.5/24", "rw", "0"], env=env, check=False)
            say("snapshot, change, revert")
            snap = share_path(call(p, S, "CreateSnapshot", "sa{sv}", "before", "0"))
            mp = os.path.join(host.state_path, "backends", "btrfs1", "mounts", p.rsplit("/", 1)[1])
            alice_txt = os.path.join(mp, "alice.txt")
            print("  alice.txt in the snapshot: " + open(alice_txt).read().strip())
            with open(alice_txt, "w") as f:
                f.write("changed on the server\n")
            print("  alice.txt changed on the server: " + open(alice_txt).read().strip())
            call(p, S, "RevertToSnapshot", "oa{sv}", snap, "0")
            print("  alice.txt after revert: " + open(alice_txt).read().strip())
            say("extend to 2 GiB")
            call(p, S, "Extend", "ta{sv}", "2", "0")
            run(["busctl", "--system", "get-property", "org.sharedd.Sharedd1", p, S, "SizeGiB"],
                env=env)
            say("revoke alice")
            call(p, S, "DenyAccess", "sa{sv}", rid, "0")
            probe_all()
            say("hook records in the spool (one JSON file per record, written atomically)")
            spool = os.path.join(host.spool_dir, "storage1")
            names = sorted(n for n in os.listdir(spool) if not n.startswith("."))
            for n in names[-8:]:
                print(f"  {n}")
            last = [n for n in names if "post-allow_access" in n][-1]
            print(f"  $ jq . {last}   (the post record of bob's grant; one line in the file)")
            with open(os.path.join(spool, last)) as f:
                print(textwrap.indent(json.dumps(json.loads(f.read()), indent=2),
                                      "  "))
            mountd_step(host, lab, bob, spool, tmp)
            say("delete")
            call(snap, "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", "0")
            call(p, S, "Delete", "a{sv}", "0")
            probe_all()
            destroy_storage_host(host)
            host = None
            say("done: everything the demo started is stopped and removed")
    finally:
        if host is not None:
            destroy_storage_host(host)
        try:
            os.kill(bus.pid, 15)
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def mountd_step(host, lab, client_ns, spool, tmp):
    say("sharedd-mountd on client bob: reads the spool, matches bob's own addresses, mounts")
    have_nfs = any(line.split()[-1] in ("nfs", "nfs4") for line in open("/proc/filesystems"))
    conf = os.path.join(tmp, "mountd.conf")
    # bob trusts the storage host's record signing key (sharedd --print-public-key)
    key = signing.parse_public_line(host.get("/org/sharedd/Sharedd1",
                                             "org.sharedd.Sharedd1.Manager", "RecordSigningKey"))
    with open(conf, "w") as f:
        f.write(f"[mountd]\nspool_dir = {host.spool_dir}\nmount_dir = {tmp}/mnt\n"
                f"state_path = {tmp}/mountd-state\nconsume_interval = 2\n"
                f"trusted_keys = {key.inline()}\n")
    print(textwrap.indent(open(conf).read().strip(), "  "))
    if not have_nfs:
        print("  NOTE: this machine's kernel has no NFS client (no nfs/nfs4 in /proc/filesystems), so the\n"
              "  final mount(8) call fails here; every step before it is real. The test suite\n"
              "  proves the real mount inside a Debian guest under qemu.")
    proc = subprocess.Popen(["ip", "netns", "exec", client_ns, "/usr/bin/python3", "-m", "mountd",
                             "--config", conf, "--no-bus"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(f"  $ ip netns exec <bob> /usr/bin/python3 -m mountd --config {conf} --no-bus"
          f"   (from the checkout; installed, the command is sharedd-mountd; pid {proc.pid},"
          " stopped after 6 s)")
    time.sleep(6)
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    print(textwrap.indent(out.strip()[-4000:], "  | "))


def _interrupted(signum, frame):
    # A second Ctrl-C must not cut the clean-up short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted)
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo had started is stopped and removed",
              file=sys.stderr)
        sys.exit(130)
