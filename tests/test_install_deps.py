"""tools/install-deps: it says what it installs, and with --demo it leaves
no service enabled that the packages enabled.

The package is a real one built here (dpkg-deb) whose postinst enables and
starts a unit the way Debian's packages do (deb-systemd-helper,
deb-systemd-invoke), served from a local apt repository (file:, no network),
installed by the real apt-get and dpkg and purged at the end.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import uuid

import pytest

from tests.support import components

REPO = pathlib.Path(__file__).resolve().parent.parent
UNIT_DIR = pathlib.Path("/etc/systemd/system/multi-user.target.wants")

POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    deb-systemd-helper enable {unit} >/dev/null
    # honours policy-rc.d, as every Debian service package does
    deb-systemd-invoke start {unit} >/dev/null || true
fi
"""
POSTRM = """#!/bin/sh
set -e
if [ "$1" = purge ]; then
    deb-systemd-helper purge {unit} >/dev/null || true
fi
"""
UNIT = """[Unit]
Description=sharedd install-deps test unit

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture
def local_repo(tmp_path):
    """(package name, unit name, APT_OPTIONS) of a one-package local repository."""
    name = f"sharedd-test-svc-{uuid.uuid4().hex[:8]}"
    unit = f"{name}.service"
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system" / unit).write_text(UNIT)
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: sharedd tests "
        f"<root@localhost>\nDescription: a unit enabled by its postinst\n")
    for script, text in (("postinst", POSTINST), ("postrm", POSTRM)):
        path = root / "DEBIAN" / script
        path.write_text(text.format(unit=unit))
        path.chmod(0o755)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root),
                    str(repo / f"{name}_1.0_all.deb")], check=True, capture_output=True)
    packages = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=repo,
                              check=True, capture_output=True).stdout
    (repo / "Packages").write_bytes(packages)
    sources = tmp_path / "sources.list"
    sources.write_text(f"deb [trusted=yes] file:{repo} ./\n")
    lists = tmp_path / "lists"
    (lists / "partial").mkdir(parents=True)
    options = (f"-o Dir::Etc::sourcelist={sources} -o Dir::Etc::sourceparts=- "
               f"-o Dir::State::Lists={lists} -o APT::Get::List-Cleanup=0")
    try:
        yield name, unit, options
    finally:
        subprocess.run(["dpkg", "--purge", name], capture_output=True)


def install_deps(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "tools/install-deps"), *args], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, **env))


def test_demo_install_says_what_and_leaves_no_unit_enabled(local_repo, tmp_path):
    name, unit, options = local_repo
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a test list\n{name}\n")
    policy_before = os.path.exists("/usr/sbin/policy-rc.d")
    env = {"SHAREDD_DEPS_LIST": str(listing), "APT_OPTIONS": options, "CI": "false"}
    out = install_deps("--demo", env=env)
    components.used("apt-get and dpkg (tools/install-deps, a local repository)")
    assert out.returncode == 0, out.stderr
    assert "installing 1 Debian package(s) for the demo" in out.stdout
    assert name in out.stdout.split("\n")[0]
    assert subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", name],
                          capture_output=True, text=True).stdout == "installed"
    # the postinst enabled it; install-deps disabled it again and said so
    assert "disabled what those packages enabled" in out.stdout and unit in out.stdout
    assert not (UNIT_DIR / unit).exists()
    state = subprocess.run(["systemctl", "is-enabled", unit], capture_output=True, text=True)
    assert state.stdout.strip() == "disabled", state
    assert os.path.exists("/usr/sbin/policy-rc.d") == policy_before
    # a second run: nothing to do, and it says so
    again = install_deps("--demo", env=env)
    assert again.returncode == 0 and again.stdout.strip() == \
        "install-deps: the 1 Debian packages the demo uses are installed"


def test_the_tests_install_leaves_units_as_the_packages_set_them(local_repo, tmp_path):
    """Without --demo nothing is disabled (the test suite's own business)."""
    name, unit, options = local_repo
    listing = tmp_path / "list.txt"
    listing.write_text(f"{name}\n")
    out = install_deps(env={"SHAREDD_DEPS_LIST": str(listing), "APT_OPTIONS": options,
                            "CI": "false"})
    assert out.returncode == 0, out.stderr
    assert "for the tests" in out.stdout
    assert (UNIT_DIR / unit).is_symlink()


def test_unknown_argument_is_a_usage_error():
    out = install_deps("--bogus", env={})
    assert out.returncode == 2 and "usage: tools/install-deps [--demo]" in out.stderr
