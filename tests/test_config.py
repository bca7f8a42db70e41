"""Configuration validation through the real command line: every problem
names the file, section and option; drop-ins override; --check-config."""

import os
import subprocess

import pytest

PY = "/usr/bin/python3"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = """[DEFAULT]
enabled_share_backends = b1
state_path = {d}/state
spool_dir = {d}/spool

[b1]
share_driver = btrfs
share_export_ip = 192.0.2.1
btrfs_pool_path = {d}/pool
"""


def check(tmp_path, text, dropins=None):
    conf = tmp_path / "sharedd.conf"
    conf.write_text(text.format(d=tmp_path))
    for name, body in (dropins or {}).items():
        (tmp_path / "sharedd.conf.d").mkdir(exist_ok=True)
        (tmp_path / "sharedd.conf.d" / name).write_text(body)
    return subprocess.run([PY, "-m", "sharedd", "--config", str(conf), "--check-config"],
                          capture_output=True, text=True, cwd=REPO)


def test_valid_config_and_summary(tmp_path):
    proc = check(tmp_path, BASE)
    assert proc.returncode == 0, proc.stderr
    assert "backend b1: driver btrfs, protocols NFS" in proc.stdout


def test_an_unlisted_valid_section_is_named_as_not_served(tmp_path):
    proc = check(tmp_path, BASE + "\n[spare]\nshare_driver = btrfs\nbtrfs_pool_path = /p\n")
    assert proc.returncode == 0, proc.stderr
    assert "section [spare]: valid, not served (not in enabled_share_backends)" in proc.stdout


def test_the_shipped_configuration_is_valid(tmp_path):
    text = open(os.path.join(REPO, "etc", "sharedd.conf")).read()
    conf = tmp_path / "sharedd.conf"
    conf.write_text(text)
    proc = subprocess.run([PY, "-m", "sharedd", "--config", str(conf), "--check-config"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "backend btrfs: driver btrfs" in proc.stdout


@pytest.mark.parametrize("change, message", [
    (("share_export_ip = 192.0.2.1", "share_export_ip = 192.0.2.300"),
     "[b1] share_export_ip: '192.0.2.300' is not an IPv4 or IPv6 address"),
    (("btrfs_pool_path = {d}/pool", "btrfs_pool_path = pool"), "[b1] btrfs_pool_path: 'pool' is not an absolute path"),
    (("share_driver = btrfs", "share_driver = zfs"), "[b1] share_driver: 'zfs' is neither one of"),
    (("[b1]\n", "[b1]\ncolour = blue\n"), "[b1] colour: unknown option"),
    (("enabled_share_backends = b1", "enabled_share_backends = b1, b2"), "no section [b2]"),
    (("[b1]\n", "[b1]\nenable_pre_hooks = maybe\n"), "[b1] enable_pre_hooks: 'maybe' is not a boolean"),
    (("[b1]\n", "[b1]\nhook_drivers = spool, no such\n"), "[b1] hook_drivers:"),
    (("[b1]\n", "[b1]\nreserved_share_percentage = 120\n"), "above the maximum 100"),
    (("[b1]\n", "[b1]\nenabled_share_protocols = NFS, GLUSTERFS\n"), "driver btrfs cannot serve GLUSTERFS"),
    (("[DEFAULT]\n", "[DEFAULT]\nfrobnicate = 1\n"), "[DEFAULT] frobnicate: unknown option"),
    # the option probably meant; integers as written
    (("[DEFAULT]\n", "[DEFAULT]\ncommand_timout = 5\n"),
     "[DEFAULT] command_timout: unknown option (did you mean command_timeout?)"),
    (("[b1]\n", "[b1]\nreserved_share_percentge = 5\n"),
     "[b1] reserved_share_percentge: unknown option (did you mean reserved_share_percentage?)"),
    (("[b1]\n", "[b1]\nreserved_share_percentage = -3\n"),
     "[b1] reserved_share_percentage: -3 is below the minimum 0"),
    # a hook is loaded at --check-config, not first at start
    (("[b1]\n", "[b1]\nhook_drivers = spool, nosuch.module:Hook\n"),
     "[b1] hook_drivers: cannot load 'nosuch.module:Hook': No module named 'nosuch'"),
    (("[b1]\n", "[b1]\nhook_drivers = sharedd.config:Config\n"),
     "[b1] hook_drivers: 'sharedd.config:Config' is not a sharedd Hook class"),
    # a section enabled_share_backends does not list is checked all the same
    (("[b1]\n", "[spare]\nshare_driver = bogus\n\n[b1]\n"),
     "[spare] share_driver: 'bogus' is neither one of"),
    (("[b1]\n", "[spare]\nshare_driver = btrfs\nbtrfs_pool_path = /p\ncolor = 1\n\n[b1]\n"),
     "[spare] color: unknown option"),
    # INI syntax, in one line with its line number
    (("[b1]\n", "[b1]\nnot an option line\n"),
     "line 7: 'not an option line' is neither 'option = value' nor a [section]"),
    (("[DEFAULT]\n", "stray = 1\n[DEFAULT]\n"), "line 1: 'stray = 1' comes before any [section] header"),
    (("[b1]\n", "[b1]\nshare_driver = volume\n"), "line 8: [b1] share_driver is set twice"),
])
def test_bad_config_names_file_section_option(tmp_path, change, message):
    old, new = change
    text = BASE.replace(old, new)
    proc = check(tmp_path, text)
    assert proc.returncode == 1
    assert str(tmp_path / "sharedd.conf") in proc.stderr
    assert message.format(d=tmp_path) in proc.stderr, proc.stderr


@pytest.mark.parametrize("ip_line, warning", [
    ("", "[b1] share_export_ip is not set"),
    ("share_export_ip = 127.0.0.1\n", "[b1] share_export_ip = 127.0.0.1 is a loopback address"),
    ("share_export_ip = ::1\n", "[b1] share_export_ip = ::1 is a loopback address"),
    ("share_export_ip = 192.0.2.1\n", None),
])
def test_export_address_is_checked_and_what_to_set_is_said(tmp_path, ip_line, warning):
    """The shipped configuration names no export address: it loads (the
    service starts), and --check-config says what to set."""
    proc = check(tmp_path, BASE.replace("share_export_ip = 192.0.2.1\n", ip_line))
    assert proc.returncode == 0, proc.stderr
    if warning is None:
        assert "warning:" not in proc.stdout
    else:
        assert f"warning: {warning}" in proc.stdout, proc.stdout


def test_shipped_config_names_no_loopback_export_address():
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(REPO, "etc", "sharedd.conf"))
    for section in parser.sections():
        assert not parser.has_option(section, "share_export_ip") or \
            not parser.get(section, "share_export_ip").startswith(("127.", "::1")), section


def test_dropin_overrides_and_is_named_in_errors(tmp_path):
    proc = check(tmp_path, BASE, {"50-local.conf": "[b1]\nshare_export_ip = 198.51.100.7\n"})
    assert proc.returncode == 0
    proc = check(tmp_path, BASE, {"60-bad.conf": "[b1]\nmax_over_subscription_ratio = lots\n"})
    assert proc.returncode == 1
    assert "sharedd.conf.d/60-bad.conf: [b1] max_over_subscription_ratio:" in proc.stderr


def test_missing_file_and_help(tmp_path):
    proc = subprocess.run([PY, "-m", "sharedd", "--config", str(tmp_path / "none.conf")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and "none.conf: file not found" in proc.stderr
    proc = subprocess.run([PY, "-m", "sharedd", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "--check-config" in proc.stdout and "sharedd.conf(5)" in proc.stdout
