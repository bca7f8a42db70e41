"""sharedd's process contract with systemd, on a real notify socket:
READY=1 after the bus name is owned, STATUS= lines, WATCHDOG=1 pings when
WATCHDOG_USEC is set, SIGHUP reload (bad config kept out), clean SIGTERM."""

import signal

from tests.test_api_memory import CONFIG


def test_notify_watchdog_reload_and_stop(sharedd_factory, system_bus):
    d = sharedd_factory(CONFIG, start=False)
    d.start(extra_env={"WATCHDOG_USEC": "400000"})
    # READY came after the name was owned: the name answers now.
    owner = system_bus.busctl("status", "org.sharedd.Sharedd1").stdout
    assert f"PID={d.proc.pid}" in owner
    status = d.wait_notify("STATUS=serving")
    assert "0 share(s) on 2 backend(s)" in status
    d.notifications.clear()
    d.wait_notify("WATCHDOG=1", timeout=5)     # pinged at half the interval
    # Reload with a broken file: refused, the daemon keeps serving.
    good = open(d.config_path).read()
    open(d.config_path, "w").write(good.replace("[mem2]\n", "[mem2]\nbogus_option = 1\n"))
    d.notifications.clear()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_notify("RELOADING=1")
    d.wait_notify("READY=1")
    assert "reload refused" in d.log_tail() and "bogus_option: unknown option" in d.log_tail()
    assert d.create_share("after-bad-reload")
    open(d.config_path, "w").write(good.replace("enable_periodic_hooks = true", "enable_periodic_hooks = false"))
    d.notifications.clear()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_notify("READY=1")
    assert "configuration reloaded" in d.log_tail()
    d.notifications.clear()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    d.wait_notify("STOPPING=1", timeout=2)     # already queued on the socket
    out = system_bus.busctl("status", "org.sharedd.Sharedd1", check=False)
    assert out.returncode != 0, "the bus name is released on stop"


def test_second_instance_refuses_cleanly(sharedd_factory):
    d = sharedd_factory(CONFIG)
    other = sharedd_factory(CONFIG, start=False, name="second")
    other.start(expect_ready=False)
    assert other.proc.wait(60) == 1
    assert "owned by another process" in other.log_tail()
    assert "Traceback" not in other.log_tail()
    assert d.proc.poll() is None
