"""Test configuration: loads every fixture module in tests/fixtures/,
prints the real components the run exercised, and (with SHAREDD_NO_SKIPS=1,
as .ci/run sets) turns any skip or xfail into a failed run."""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402

pytest.register_assert_rewrite("tests.fixtures", "tests.support")

from tests.support import components  # noqa: E402

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (pathlib.Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    used = components.all_used()
    terminalreporter.write_line(
        "real components exercised: " + (", ".join(used) if used else "none"))


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("SHAREDD_NO_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    bad = len(reporter.stats.get("skipped", [])) + len(reporter.stats.get("xfailed", [])) \
        + len(reporter.stats.get("xpassed", []))
    if bad and session.exitstatus == 0:
        reporter.write_line(f"FAILED: {bad} test(s) skipped or xfailed; "
                            "every test must run on this machine kind")
        session.exitstatus = 1
