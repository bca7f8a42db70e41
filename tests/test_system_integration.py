"""The Debian packages under a real systemd (PID 1 in systemd-nspawn).

The packages are built from this checkout (tools/build-debs, lintian-clean),
installed with apt-get into a booted Debian bookworm container whose base
already holds every dependency (no network inside), and then driven the way
an administrator would: systemctl, busctl, journalctl, apt-get purge.

The share created through the installed unit is exported by the
distribution's own nfs-ganesha.service and read back with nfs-ls: that
proves the unit's mounts reach the rest of the host although the unit is
sandboxed (see systemd/sharedd.service and doc/security.md).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import pytest

from tests.fixtures import nspawn
from tests.support import components

REPO = pathlib.Path(__file__).resolve().parent.parent

BUS = "org.sharedd.Sharedd1"
ROOT = "/org/sharedd/Sharedd1"
MANAGER = "org.sharedd.Sharedd1.Manager"
SHARE = "org.sharedd.Sharedd1.Share"
SNAPSHOT = "org.sharedd.Sharedd1.Snapshot"
MOUNTD_BUS = "org.sharedd.Mountd1"
MOUNTD_ROOT = "/org/sharedd/Mountd1"

# NFSv4 only: rpcbind is masked in the container (no kernel NFS pieces here).
GANESHA_CONF = """\
NFS_CORE_PARAM { Protocols = 4; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; }
NFSv4 { Graceless = true; Only_Numeric_Owners = true; RecoveryBackend = fs; RecoveryRoot = /var/lib/nfs/ganesha; }
NFS_KRB5 { Active_krb5 = false; }
"""

UNITS = ("sharedd.service", "sharedd-mountd.service")
POLICY_FILES = ("/usr/share/dbus-1/system.d/org.sharedd.Sharedd1.conf",
                "/usr/share/dbus-1/system.d/org.sharedd.Mountd1.conf",
                "/usr/share/dbus-1/system-services/org.sharedd.Sharedd1.service",
                "/usr/share/dbus-1/system-services/org.sharedd.Mountd1.service")


@pytest.fixture(scope="module")
def debs(built_debs):
    """The packages built from the checkout (tests/fixtures/debs.py), lintian-clean."""
    return built_debs


@pytest.fixture(scope="module")
def ct(debs, nspawn_base):
    """A booted container with the packages installed and ganesha running."""
    with nspawn.boot(nspawn_base, bind_ro={str(debs[0]): "/mnt/debs"}) as c:
        c.write("/etc/ganesha/ganesha.conf", GANESHA_CONF)
        c.run("systemctl", "restart", "nfs-ganesha.service")
        c.run("systemctl", "is-active", "nfs-ganesha.service")
        components.used("NFS-Ganesha (nfs-ganesha.service in the container)")
        # The shipped configuration names no export address (the administrator
        # must); this container's clients are itself, on loopback.
        c.run("mkdir", "-p", "/etc/sharedd/sharedd.conf.d")
        c.write("/etc/sharedd/sharedd.conf.d/50-test.conf", "[btrfs]\nshare_export_ip = 127.0.0.1\n")
        debfiles = sorted(str(p.name) for p in debs[0].glob("*.deb"))
        proc = c.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                     "--no-install-recommends", *[f"/mnt/debs/{d}" for d in debfiles],
                     timeout=300)
        c.install_log = proc.stdout + proc.stderr
        try:
            yield c
        finally:
            _release_loop_devices(c)


def _release_loop_devices(c) -> None:
    """Loop devices are host-wide: detach the ones the daemon attached for
    its pool image even if a test failed half-way (poweroff usually does)."""
    c.run("systemctl", "stop", "sharedd.service", "sharedd-mountd.service", check=False)
    out = c.run("losetup", "-n", "-O", "NAME,BACK-FILE", check=False).stdout
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].startswith("/var/lib/sharedd/"):
            targets = c.run("findmnt", "-rn", "-S", parts[0], "-o", "TARGET", check=False).stdout.split()
            for target in sorted(targets, key=len, reverse=True):
                c.run("umount", "-l", target, check=False)
            c.run("losetup", "-d", parts[0], check=False)


# --- helpers ----------------------------------------------------------------

def busctl(c, *args, user=None, check=True):
    return c.run("busctl", "--system", "--json=short", "--timeout=120", *args,
                 user=user, check=check)


def call(c, path, iface, method, sig, *args, user=None):
    out = busctl(c, "call", BUS, path, iface, method, sig, *args, user=user).stdout
    return json.loads(out)["data"] if out.strip() else []


def prop(c, path, iface, name, bus=BUS):
    return json.loads(busctl(c, "get-property", bus, path, iface, name).stdout)["data"]


def main_pid(c, unit="sharedd.service") -> int:
    return int(c.sh_out("systemctl", "show", "-P", "MainPID", unit).strip())


def wait_active(c, unit="sharedd.service", timeout=60):
    c.wait_for(lambda: c.run("systemctl", "is-active", unit, check=False).stdout.strip() == "active"
               and main_pid(c, unit) > 0, timeout=timeout, what=f"{unit} active")


def share_mount(c, share_id: str) -> str:
    """Where the share is mounted in the container's main mount namespace."""
    mounts = c.sh_out("findmnt", "-rn", "-o", "TARGET").split()
    hits = [m for m in mounts if m.rstrip("/").endswith(share_id)]
    assert hits, f"no mount for share {share_id} in PID 1's namespace: {mounts}"
    return hits[0]


def nfs_ls(c, export: str, check=False):
    host, _, path = export.partition(":")
    return c.run("nfs-ls", f"nfs://{host}{path}?version=4", check=check, timeout=60)


def create_share(c, name, user=None) -> str:
    return call(c, ROOT, MANAGER, "CreateShare", "ssta{sv}", name, "NFS", "1", "0", user=user)[0]


# --- tests -----------------------------------------------------------------

def test_packages_build_lintian_clean(debs):
    out, log = debs
    names = sorted(p.name for p in out.glob("*.deb"))
    assert names == ["python3-sharedd_0.1.0_all.deb", "sharedd-mountd_0.1.0_all.deb",
                     "sharedd_0.1.0_all.deb"]
    assert not re.search(r"^[EW]: ", log, re.M), log
    assert not (REPO / "debian").exists(), "the build must not touch the checkout"


def test_units_installed_enabled_active_and_verified(ct):
    for unit in UNITS:
        assert ct.sh_out("systemctl", "is-enabled", unit).strip() == "enabled"
        wait_active(ct, unit)
        props = ct.sh_out("systemctl", "show", "-p", "Type", "-p", "NotifyAccess",
                          "-p", "WatchdogUSec", "-p", "Restart", unit)
        assert "Type=notify" in props and "NotifyAccess=main" in props, props
        assert "Restart=on-failure" in props and "WatchdogUSec=30s" in props, props
        assert ct.sh_out("systemctl", "show", "-P", "UMask", unit).strip() == "0077", unit
        path = ct.sh_out("systemctl", "show", "-P", "FragmentPath", unit).strip()
        verify = ct.run("systemd-analyze", "verify", "--man=no", path, check=False)
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    assert ct.sh_out("systemctl", "show", "-P", "BusName", "sharedd.service").strip() == BUS
    for f in POLICY_FILES:
        ct.run("test", "-f", f)
    # The interface descriptions, for D-Bus tooling.
    xml = ct.sh_out("ls", "/usr/share/dbus-1/interfaces").split()
    want = sorted(p.name for p in (REPO / "dbus").glob("org.sharedd.Sharedd1.*.xml"))
    assert want and set(want) <= set(xml), (want, xml)
    assert "sharedd:" in ct.sh_out("getent", "group", "sharedd")
    assert ct.sh_out("stat", "-c", "%a %U", "/var/lib/sharedd").split() == ["750", "root"]
    assert ct.sh_out("stat", "-c", "%a %U", "/var/spool/sharedd").split() == ["755", "root"]
    assert ct.sh_out("stat", "-c", "%a", "/var/lib/sharedd-mountd").strip() == "700"
    # Only root and the sharedd group read the configuration (secrets' files, accounts).
    assert ct.sh_out("stat", "-c", "%a %U %G", "/etc/sharedd/sharedd.conf").split() == \
        ["640", "root", "sharedd"]
    # The shipped config is a conffile and validates as installed.
    assert "/etc/sharedd/sharedd.conf" in ct.sh_out("dpkg-query", "-W", "-f=${Conffiles}", "sharedd")
    ct.run("sharedd", "--check-config", "--config", "/etc/sharedd/sharedd.conf")
    ct.run("sharedd-mountd", "--check-config", "--config", "/etc/sharedd/mountd.conf")
    # The record signing key was made at install; its public half is published
    # as a file, by --print-public-key and on the bus, all the same.
    assert ct.sh_out("stat", "-c", "%a %U", "/etc/sharedd/record-signing.key").split() == \
        ["600", "root"]
    pub = ct.sh_out("cat", "/etc/sharedd/record-signing.pub").strip()
    assert pub.startswith("sharedd-ed25519 ") and len(pub.split()) == 3, pub
    assert ct.sh_out("sharedd", "--print-public-key").strip() == pub
    assert prop(ct, ROOT, MANAGER, "RecordSigningKey") == pub
    ct.run("test", "-d", "/etc/sharedd/trusted-keys.d")
    for page in ("sharedd", "sharedd.conf", "sharedd-mountd", "sharedd-mountd.conf"):
        section = "5" if page.endswith(".conf") else "8"
        ct.run("test", "-f", f"/usr/share/man/man{section}/{page}.{section}.gz")


def test_units_share_the_host_mount_namespace(ct):
    """Sandboxing must not give the daemons a private mount namespace."""
    pid1 = ct.sh_out("readlink", "/proc/1/ns/mnt").strip()
    for unit in UNITS:
        pid = main_pid(ct, unit)
        assert ct.sh_out("readlink", f"/proc/{pid}/ns/mnt").strip() == pid1, unit
        status = ct.sh_out("cat", f"/proc/{pid}/status")
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), unit
        assert re.search(r"^Seccomp:\s+2$", status, re.M), unit
        capbnd = int(re.search(r"^CapBnd:\s+([0-9a-f]+)$", status, re.M).group(1), 16)
        assert capbnd != (1 << 41) - 1 and capbnd & (1 << 21), f"{unit}: CapBnd {capbnd:x}"


def test_introspect_and_read_only_properties(ct):
    intro = ct.sh_out("busctl", "--system", "introspect", BUS, ROOT)
    for member in ("CreateShare", "ListShares", "FindShareByName", "RunPeriodicHooks",
                   "org.freedesktop.DBus.ObjectManager", "Fired"):
        assert member in intro, member
    assert prop(ct, ROOT, MANAGER, "Version") == "0.1.0"
    assert prop(ct, ROOT, MANAGER, "Backends") == [f"{ROOT}/backend/btrfs"]


def test_sharectl_from_the_package(ct):
    """The installed sharectl drives the installed unit; a user outside the
    sharedd group may read but not change (exit status 1 with the error)."""
    out = ct.sh_out("sharectl", "share", "create", "from-ctl", "--size", "1")
    assert out.startswith("share from-ctl created: ")
    table = ct.sh_out("sharectl", "share", "list")
    assert any(line.split()[0] == "from-ctl" for line in table.splitlines()[1:])
    ct.run("useradd", "--system", "--no-create-home", "ctl-reader", check=False)
    assert "from-ctl" in ct.sh_out("sharectl", "share", "list", user="ctl-reader")
    refused = ct.run("sharectl", "--no-user-interaction", "share", "delete", "from-ctl",
                     user="ctl-reader", check=False)
    assert refused.returncode == 1 and \
        "org.sharedd.Sharedd1.Error.NotAuthorized: Delete needs" in refused.stderr, refused
    assert ct.run("test", "-f", "/usr/share/bash-completion/completions/sharectl",
                  check=False).returncode == 0
    ct.run("sharectl", "share", "delete", "from-ctl")


def test_share_lifecycle_exported_by_ganesha(ct):
    path = create_share(ct, "demo")
    assert path.startswith(f"{ROOT}/share/")
    sid = prop(ct, path, SHARE, "Id")
    assert prop(ct, path, SHARE, "Status") == "available"
    exports = prop(ct, path, SHARE, "ExportLocations")
    assert exports and exports[0].startswith("127.0.0.1:"), exports

    # The unit's subvolume mount is visible in PID 1's namespace: write there.
    mnt = share_mount(ct, sid)
    ct.write(f"{mnt}/hello-from-host.txt", "written outside the unit\n")

    access_id = call(ct, path, SHARE, "AllowAccess", "sssa{sv}", "ip", "127.0.0.1", "rw", "0")[0]
    rules = prop(ct, path, SHARE, "AccessRules")
    assert [r[0] for r in rules] == [access_id] and rules[0][4] == "active", rules

    # nfs-ganesha.service (its own unit) serves the mount sharedd made.
    listing = ct.wait_for(lambda: (lambda p: p.returncode == 0 and "hello-from-host.txt" in p.stdout
                                   and p.stdout)(nfs_ls(ct, exports[0])),
                          timeout=20, what="nfs-ls through ganesha")
    assert "hello-from-host.txt" in listing

    snap = call(ct, path, SHARE, "CreateSnapshot", "sa{sv}", "snap1", "0")[0]
    assert snap.startswith(f"{ROOT}/snapshot/")
    assert prop(ct, snap, SNAPSHOT, "Status") == "available"
    assert prop(ct, snap, SNAPSHOT, "Share") == path

    call(ct, path, SHARE, "DenyAccess", "sa{sv}", access_id, "0")
    assert prop(ct, path, SHARE, "AccessRules") == []
    denied = nfs_ls(ct, exports[0])
    assert "hello-from-host.txt" not in denied.stdout, denied.stdout

    call(ct, snap, SNAPSHOT, "Delete", "a{sv}", "0")
    call(ct, path, SHARE, "Delete", "a{sv}", "0")
    assert call(ct, ROOT, MANAGER, "ListShares", "a{sv}", "0")[0] == []
    mounts = ct.sh_out("findmnt", "-rn", "-o", "TARGET")
    assert sid not in mounts

    # The hooks wrote spool records for each step, under this host's directory.
    names = ct.sh_out("find", "/var/spool/sharedd", "-name", "*.json", "-printf", "%f\n").split()
    for want in ("pre-create_share", "post-create_share", "post-allow_access",
                 "pre-deny_access", "post-create_snapshot", "pre-delete_share"):
        assert any(want in n for n in names), (want, names)
    owners = set(ct.sh_out("find", "/var/spool/sharedd", "-name", "*.json",
                           "-printf", "%u\n").split())
    assert owners == {"root"}


def test_exports_survive_sharedd_and_ganesha_restarts(ct):
    path = create_share(ct, "durable")
    try:
        export = prop(ct, path, SHARE, "ExportLocations")[0]
        call(ct, path, SHARE, "AllowAccess", "sssa{sv}", "ip", "127.0.0.1", "ro", "0")
        ct.write(f"{share_mount(ct, prop(ct, path, SHARE, 'Id'))}/kept.txt", "x\n")

        def listed():
            return "kept.txt" in nfs_ls(ct, export).stdout

        ct.wait_for(listed, timeout=20, what="export before restarts")
        ct.run("systemctl", "restart", "sharedd.service")
        wait_active(ct)
        assert listed(), "the export must stay while sharedd restarts"
        # Runtime exports vanish with ganesha; sharedd re-adds them.
        ct.run("systemctl", "restart", "nfs-ganesha.service")
        ct.wait_for(listed, timeout=60, what="export re-added after a ganesha restart")
    finally:
        call(ct, path, SHARE, "Delete", "a{sv}", "0")


def test_a_private_mount_namespace_would_hide_share_mounts(ct):
    """Why the units use no namespacing option: with one (PrivateTmp= here)
    the daemon's new mounts stay inside the unit, out of ganesha's reach."""
    dropin = "/run/systemd/system/sharedd.service.d/test-private.conf"
    ct.write(dropin, "[Service]\nPrivateTmp=yes\n")
    try:
        ct.run("systemctl", "daemon-reload")
        ct.run("systemctl", "restart", "sharedd.service")
        wait_active(ct)
        pid = main_pid(ct)
        assert ct.sh_out("readlink", f"/proc/{pid}/ns/mnt") != ct.sh_out("readlink", "/proc/1/ns/mnt")
        created = busctl(ct, "call", BUS, ROOT, MANAGER, "CreateShare", "ssta{sv}",
                         "hidden", "NFS", "1", "0", check=False)
        # ganesha (its own unit, the host's mount namespace) cannot see the
        # subvolume mount made inside the unit, so the export is refused
        # and the share rolled back.
        assert created.returncode != 0, created.stdout
        assert "AddExport failed" in created.stderr, created.stderr
        assert "hidden" not in ct.sh_out("cat", "/proc/1/mountinfo")
    finally:
        ct.run("rm", "-f", dropin)
        ct.run("systemctl", "daemon-reload")
        ct.run("systemctl", "restart", "sharedd.service")
        wait_active(ct)
    assert call(ct, ROOT, MANAGER, "ListShares", "a{sv}", "0")[0] == []


def test_man_pages_render_cleanly_and_list_every_option():
    gen = subprocess.run(["/usr/bin/python3", str(REPO / "packaging/gen-man-options.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stdout + gen.stderr
    from sharedd import config as sconfig
    from mountd import config as mconfig
    sys_page = (REPO / "doc/man/sharedd.conf.5").read_text()
    for opt in sconfig.GLOBAL_OPTIONS + sconfig.BACKEND_OPTIONS:
        assert f'.BR "{opt.name}"' in sys_page, opt.name
    from sharedd import drivers
    for name in drivers.DRIVERS:
        for opt in getattr(drivers.driver_class(name), "OPTIONS", []):
            assert f'.BR "{opt.name}"' in sys_page, opt.name
    mnt_page = (REPO / "doc/man/sharedd-mountd.conf.5").read_text()
    for opt in mconfig.OPTIONS:
        assert f'.BR "{opt.name}"' in mnt_page, opt.name
    for page in sorted((REPO / "doc/man").iterdir()):
        proc = subprocess.run(["man", "--warnings", "-l", "-Tutf8", "-Z", str(page)],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="80"))
        assert proc.returncode == 0 and not proc.stderr.strip(), (page.name, proc.stderr)


def test_polkit_decides_per_call(ct):
    """Under the container's real polkitd: the shipped rules grant the
    sharedd group the manage actions; a non-member is refused (no password
    dialog asked for: auth.no_user_interaction); a rule naming one action
    grants exactly that one; the admin action stays with root."""
    for user, groups in (("pk-member", ["-G", "sharedd"]), ("pk-user", []),
                         ("pk-access", [])):
        ct.run("useradd", "--system", "--no-create-home", *groups, user, check=False)
    ct.write("/etc/polkit-1/rules.d/60-sharedd-test.rules",
             'polkit.addRule(function(action, subject) {\n'
             '    if (action.id == "org.sharedd.Sharedd1.manage-access" &&\n'
             '        subject.user == "pk-access") { return polkit.Result.YES; }\n});\n')
    no_dialog = ["1", "auth.no_user_interaction", "b", "true"]
    path = create_share(ct, "pk-made", user="pk-member")
    try:
        refused = busctl(ct, "call", BUS, ROOT, MANAGER, "CreateShare", "ssta{sv}", "pk-no",
                         "NFS", "1", *no_dialog, user="pk-user", check=False)
        assert refused.returncode == 1 and \
            "needs org.sharedd.Sharedd1.manage-shares" in refused.stderr, refused.stderr

        def grant(user):
            return busctl(ct, "call", BUS, path, SHARE, "AllowAccess", "sssa{sv}", "ip",
                          "127.0.0.9", "ro", *no_dialog, user=user, check=False)
        # polkit reads new rules files by itself (inotify): wait for that one
        ct.wait_for(lambda: grant("pk-access").returncode == 0, timeout=20,
                    what="polkit to read the test rule")
        assert "manage-shares" in busctl(ct, "call", BUS, path, SHARE, "Delete", "a{sv}",
                                         *no_dialog, user="pk-access", check=False).stderr
        admin = busctl(ct, "call", BUS, ROOT, MANAGER, "RunPeriodicHooks", "a{sv}", *no_dialog,
                       user="pk-member", check=False)
        assert admin.returncode == 1 and "org.sharedd.Sharedd1.admin" in admin.stderr
        busctl(ct, "call", BUS, ROOT, MANAGER, "RunPeriodicHooks", "a{sv}", "0")   # root
        # the decision was polkit's: sharedd asked it, for the caller's bus name
        log = ct.sh_out("journalctl", "-u", "sharedd.service", "--no-pager", "-o", "cat")
        assert "polkit cannot answer" not in log
    finally:
        ct.run("rm", "-f", "/etc/polkit-1/rules.d/60-sharedd-test.rules")
        call(ct, path, SHARE, "Delete", "a{sv}", "0")


def test_bus_policy_group_members_may_mutate_others_only_read(ct):
    ct.run("useradd", "--system", "--no-create-home", "-G", "sharedd", "sd-admin")
    ct.run("useradd", "--system", "--no-create-home", "sd-user")
    path = create_share(ct, "admin-made", user="sd-admin")
    try:
        refused = busctl(ct, "call", BUS, ROOT, MANAGER, "CreateShare", "ssta{sv}",
                         "nope", "NFS", "1", "0", user="sd-user", check=False)
        assert refused.returncode != 0
        assert "needs org.sharedd.Sharedd1.manage-shares" in refused.stderr, refused.stderr
        # Reads stay open to everyone.
        out = busctl(ct, "get-property", BUS, path, SHARE, "Name", user="sd-user").stdout
        assert json.loads(out)["data"] == "admin-made"
        found = busctl(ct, "call", BUS, ROOT, MANAGER, "FindShareByName", "s", "admin-made",
                       user="sd-user").stdout
        assert json.loads(found)["data"] == [path]
        # Nothing was created by the refused call.
        assert call(ct, ROOT, MANAGER, "ListShares", "a{sv}", "0")[0] == [path]
        # The change is attributed to its caller in the journal, as fields.
        uid = ct.sh_out("id", "-u", "sd-admin").strip()

        def audited():
            out = ct.run("journalctl", "-u", "sharedd.service", "-o", "json", "--no-pager",
                          f"SHAREDD_CALLER_UID={uid}", check=False).stdout
            return [json.loads(line) for line in out.splitlines() if line.strip()]
        records = ct.wait_for(audited, timeout=10, what="the audit record in the journal")
        rec = [r for r in records if r.get("SHAREDD_METHOD") == "Manager.CreateShare"][0]
        assert rec["SHAREDD_OBJECT"] == ROOT and rec["SHAREDD_RESULT"] == "ok", rec
        assert int(rec["SHAREDD_CALLER_PID"]) > 0 and rec["SHAREDD_ARGS"].startswith("admin-made NFS 1")
    finally:
        call(ct, path, SHARE, "Delete", "a{sv}", "0")


def test_reload_and_restart(ct):
    pid = main_pid(ct)
    ct.run("systemctl", "reload", "sharedd.service")
    wait_active(ct)
    assert main_pid(ct) == pid
    ct.wait_for(lambda: "reloaded" in ct.journal("sharedd.service", 20), timeout=10,
                what="reload in the journal")
    ct.run("systemctl", "restart", "sharedd.service")
    wait_active(ct)
    assert main_pid(ct) != pid
    assert prop(ct, ROOT, MANAGER, "Version") == "0.1.0"


def test_journal_is_readable(ct):
    log = ct.journal("sharedd.service", 200)
    assert "ready" in log, log
    assert "sharedd" in log


def test_dbus_activation_starts_the_unit(ct):
    ct.run("systemctl", "stop", "sharedd.service")
    assert ct.run("systemctl", "is-active", "sharedd.service", check=False).stdout.strip() == "inactive"
    shares = call(ct, ROOT, MANAGER, "ListShares", "a{sv}", "0")[0]
    assert shares == []
    wait_active(ct)


def test_watchdog_restarts_a_hung_daemon(ct):
    # A short watchdog for the test only (the unit ships 30 s); runtime drop-in.
    ct.write("/run/systemd/system/sharedd.service.d/test-watchdog.conf",
             "[Service]\nWatchdogSec=4s\n")
    try:
        ct.run("systemctl", "daemon-reload")
        ct.run("systemctl", "restart", "sharedd.service")
        wait_active(ct)
        pid = main_pid(ct)
        ct.run("kill", "-STOP", str(pid))
        ct.wait_for(lambda: main_pid(ct) not in (0, pid) and
                    ct.run("systemctl", "is-active", "sharedd.service", check=False).stdout.strip() == "active",
                    timeout=60, what="watchdog restart")
        assert "watchdog timeout" in ct.journal("sharedd.service", 200).lower()
    finally:
        ct.run("rm", "-f", "/run/systemd/system/sharedd.service.d/test-watchdog.conf")
        ct.run("systemctl", "daemon-reload")
        ct.run("systemctl", "restart", "sharedd.service")
    wait_active(ct)


def test_mountd_unit_and_bus_object(ct):
    wait_active(ct, "sharedd-mountd.service")
    intro = ct.sh_out("busctl", "--system", "introspect", MOUNTD_BUS, MOUNTD_ROOT)
    assert "Rescan" in intro and "Mounts" in intro
    mounts = json.loads(busctl(ct, "get-property", MOUNTD_BUS, MOUNTD_ROOT,
                               "org.sharedd.Mountd1", "Mounts").stdout)
    assert mounts["type"] == "a(sssss)" and isinstance(mounts["data"], list)
    # D-Bus activation: a stopped mountd is started by a call for its name.
    ct.run("systemctl", "stop", "sharedd-mountd.service")
    assert ct.run("systemctl", "is-active", "sharedd-mountd.service",
                  check=False).stdout.strip() == "inactive"
    busctl(ct, "get-property", MOUNTD_BUS, MOUNTD_ROOT, "org.sharedd.Mountd1", "Mounts")
    wait_active(ct, "sharedd-mountd.service")
    pid = main_pid(ct, "sharedd-mountd.service")
    ct.run("systemctl", "reload", "sharedd-mountd.service")
    wait_active(ct, "sharedd-mountd.service")
    assert main_pid(ct, "sharedd-mountd.service") == pid


def test_upgrade_keeps_config_shares_and_service(ct):
    """Reinstalling the packages runs the maintainer scripts' upgrade path
    (prerm upgrade, postinst configure <old version>): an administrator's
    conffile edit stays, shares and their data stay, the service comes back."""
    path = create_share(ct, "kept-over-upgrade")
    sid = prop(ct, path, SHARE, "Id")
    ct.write(f"{share_mount(ct, sid)}/data.txt", "before the upgrade\n")
    ct.run("sh", "-c", "echo '# local edit' >> /etc/sharedd/sharedd.conf")
    before = main_pid(ct)
    debfiles = ct.sh_out("sh", "-c", "ls /mnt/debs/*.deb").split()
    ct.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "--reinstall",
           "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
           *debfiles, timeout=300)
    wait_active(ct)
    assert main_pid(ct) != before, "the upgrade restarted the daemon"
    assert "# local edit" in ct.sh_out("cat", "/etc/sharedd/sharedd.conf")
    assert not ct.run("sh", "-c", "ls /etc/sharedd/*.dpkg-*", check=False).stdout.strip()
    assert call(ct, ROOT, MANAGER, "FindShareByName", "s", "kept-over-upgrade")[0] == path
    assert prop(ct, path, SHARE, "Status") == "available"
    assert ct.sh_out("cat", f"{share_mount(ct, sid)}/data.txt") == "before the upgrade\n"
    for unit in UNITS:
        assert ct.run("systemctl", "is-enabled", unit, check=False).stdout.strip() == "enabled", unit
    call(ct, path, SHARE, "Delete", "a{sv}", "0")


def test_purge_leaves_nothing_behind(ct):
    ct.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y",
           "sharedd", "sharedd-mountd", "python3-sharedd", timeout=300)
    for unit in UNITS:
        state = ct.sh_out("systemctl", "show", "-P", "LoadState", unit).strip()
        assert state == "not-found", (unit, state)
        assert ct.run("test", "-e", f"/etc/systemd/system/multi-user.target.wants/{unit}",
                      check=False).returncode != 0
    for f in POLICY_FILES + ("/etc/systemd/system/dbus-org.sharedd.Sharedd1.service",
                             "/etc/sharedd/sharedd.conf", "/etc/sharedd/mountd.conf",
                             "/etc/sharedd/record-signing.key", "/etc/sharedd/record-signing.pub",
                             "/var/spool/sharedd", "/var/lib/sharedd-mountd",
                             "/usr/sbin/sharedd", "/usr/sbin/sharedd-mountd",
                             "/usr/share/dbus-1/interfaces/org.sharedd.Sharedd1.Manager.xml"):
        assert ct.run("test", "-e", f, check=False).returncode != 0, f
    procs = ct.sh_out("ps", "-eo", "args")
    assert "sharedd" not in procs, procs
    # The state with the shares' data is kept on purge (see sharedd(8)).
    ct.run("test", "-d", "/var/lib/sharedd")
    # Nobody answers on the bus any more (no activation file either).
    gone = busctl(ct, "call", BUS, ROOT, MANAGER, "ListShares", "a{sv}", "0", check=False)
    assert gone.returncode != 0
