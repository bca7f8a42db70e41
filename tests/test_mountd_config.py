"""mountd.conf loading and `sharedd-mountd --check-config`."""

import os
import pathlib
import subprocess

import pytest

from mountd import config
from sharedd.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent


def write(path, text):
    pathlib.Path(path).write_text(text)
    return str(path)


def test_defaults_and_shipped_file_are_valid():
    cfg = config.load(str(REPO / "etc" / "mountd.conf"))
    assert cfg.spool_dir == "/var/spool/sharedd"
    assert cfg.mount_dir == "/mnt/shares"
    assert cfg.state_path == "/var/lib/sharedd-mountd"
    assert cfg.consume_interval == 30.0
    assert cfg.protocols == ["NFS", "GLUSTERFS"]
    assert cfg.mount_nosuid_nodev is True
    assert 0 in cfg.allowed_uids
    d = config.load("/nonexistent/mountd.conf", optional=True)
    assert d.values == cfg.values


def test_values_alias_and_dropins(tmp_path):
    main = write(tmp_path / "mountd.conf", "[mountd]\nsleep_between_consume_attempts = 5\n"
                 "expected_ip_addresses = 10.74.0.11, fd74::11\nprotocols = nfs\n"
                 "nfs_mount_options = vers=4.2,hard\nallowed_spool_owners = root, 4242\n")
    os.mkdir(tmp_path / "mountd.conf.d")
    write(tmp_path / "mountd.conf.d" / "10-local.conf", "[mountd]\nmount_dir = /srv/m\n")
    write(tmp_path / "mountd.conf.d" / "20-later.conf", "[mountd]\nmount_dir = /srv/later\n")
    cfg = config.load(main)
    assert cfg.consume_interval == 5.0
    assert cfg.expected_ip_addresses == ["10.74.0.11", "fd74::11"]
    assert cfg.protocols == ["NFS"]
    assert cfg.nfs_mount_options == ["vers=4.2", "hard"]
    assert cfg.mount_dir == "/srv/later"
    assert cfg.allowed_uids == (0, 4242)
    assert len(cfg.files) == 3


@pytest.mark.parametrize("body,needle", [
    ("[mountd]\nbogus = 1\n", "[mountd] bogus: unknown option"),
    ("[other]\nx = 1\n", "[other]: unknown section"),
    ("[mountd]\nprotocols = NFS, CIFS\n", "CIFS is not supported"),
    ("[mountd]\nprotocols = AFS\n", "'AFS' is not one of"),
    ("[mountd]\nconsume_interval = soon\n", "[mountd] consume_interval: 'soon' is not a number"),
    ("[mountd]\nconsume_interval = 0\n", "below the minimum"),
    ("[mountd]\nexpected_ip_addresses = 10.74.0.300\n", "not an IPv4 or IPv6 address"),
    ("[mountd]\nmount_dir = relative/path\n", "[mountd] mount_dir: 'relative/path' is not an absolute path"),
    ("[mountd]\nmount_nosuid_nodev = maybe\n", "is not a boolean"),
    ("[mountd]\nnfs_mount_options = suid\n", "'suid' is not an allowed nfs4 mount option"),
    ("[mountd]\nglusterfs_mount_options = volfile-server=x\n", "not an allowed glusterfs"),
    ("[mountd]\nglusterfs_client_cert = /nonexistent.pem\nglusterfs_client_key = /nonexistent.key\n",
     "does not exist"),
    ("[mountd]\nglusterfs_ca = /etc/hostname\n", "must be set together"),
    ("[mountd]\nallowed_spool_owners = no-such-user-74\n", "no such user"),
    ("[mountd]\ninterfaces = eth0;rm\n", "not an interface name"),
    ("[mountd]\nlog_level = loud\n", "not one of"),
    ("[mountd\n", "mountd.conf"),
])
def test_errors_name_file_section_and_option(tmp_path, body, needle):
    path = write(tmp_path / "mountd.conf", body)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert needle in str(exc.value)
    assert str(exc.value).startswith(path)


def test_error_in_dropin_names_the_dropin(tmp_path):
    main = write(tmp_path / "mountd.conf", "[mountd]\n")
    os.mkdir(tmp_path / "mountd.conf.d")
    bad = write(tmp_path / "mountd.conf.d" / "50-bad.conf", "[mountd]\nmount_timeout = -1\n")
    with pytest.raises(ConfigError, match=r"50-bad.conf: \[mountd\] mount_timeout"):
        config.load(main)
    assert bad


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        config.load(str(tmp_path / "nope.conf"))


def _cli(*args):
    return subprocess.run(["/usr/bin/python3", "-m", "mountd", *args], capture_output=True,
                          text=True, timeout=60, cwd=str(REPO))


def test_check_config_cli(tmp_path):
    good = write(tmp_path / "good.conf", "[mountd]\nconsume_interval = 10\n")
    proc = _cli("--check-config", "--config", good)
    assert proc.returncode == 0 and "configuration OK" in proc.stdout
    bad = write(tmp_path / "bad.conf", "[mountd]\nprotocols = CIFS\n")
    proc = _cli("--check-config", "--config", bad)
    assert proc.returncode == 1      # as sharedd's; 2 is a usage error
    assert f"{bad}: [mountd] protocols: CIFS is not supported" in proc.stderr
    proc = _cli("--check-config", "--config", str(tmp_path / "missing.conf"))
    assert proc.returncode == 1 and "file not found" in proc.stderr
    proc = _cli("--no-such-option")
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = _cli("--help")
    assert proc.returncode == 0 and "--check-config" in proc.stdout and "--no-bus" in proc.stdout
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("sharedd-mountd ")
