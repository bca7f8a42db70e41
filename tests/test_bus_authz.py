"""Who a caller is and what it may hold, against hostile callers.
Authorization checks that polkit answers late or never (a user's own
authentication agent may never answer): a user has at most CHECKS_PER_USER
in progress and everyone CHECKS_MAX, one more is told LimitsExceeded before
polkit is asked; a check not answered in time is cancelled and refused
(against a stand-in for polkit's bus calls; the real polkitd decides in
tests/test_system_integration.py). The audit record's unit is the one the
system's manager made, not a name the caller chose."""

import asyncio

import pytest
from dbus_next.constants import ErrorType, MessageType
from dbus_next.errors import DBusError

from sharedd.bus import authz
from sharedd.errors import NotAuthorized


async def settle():
    for _ in range(10):          # (each check reaches polkit's call a few steps later)
        await asyncio.sleep(0)


class Auditor:
    async def caller(self, sender):
        return (int(sender.split(".")[-1]), 1, "")      # ":1.<uid>"


class Polkit:
    """Holds each CheckAuthorization until answered; records what is sent."""

    def __init__(self):
        self.pending, self.sent = [], []

    async def call(self, msg):
        assert msg.member == "CheckAuthorization"
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((msg, fut))
        return await fut

    def send(self, msg):
        self.sent.append(msg)

    def answer(self, authorized):
        msg, fut = self.pending.pop(0)
        fut.set_result(type("Reply", (), {"message_type": MessageType.METHOD_RETURN,
                                          "body": [[authorized, False, {}]]})())


def test_checks_in_progress_are_bounded_per_user_and_in_all(monkeypatch):
    monkeypatch.setattr(authz, "CHECKS_MAX", 6)
    polkit = Polkit()
    a = authz.Authorizer(polkit, Auditor(), mode="polkit")

    async def main():
        def check(uid):
            return asyncio.ensure_future(a.check(f":1.{uid}", "org.sharedd.Sharedd1.Manager",
                                                 "CreateShare"))
        first = [check(1000) for _ in range(authz.CHECKS_PER_USER)]
        await settle()
        with pytest.raises(DBusError) as refused:
            await check(1000)
        assert refused.value.type == ErrorType.LIMITS_EXCEEDED.value
        assert refused.value.text == authz.TOO_MANY_CHECKS
        others = [check(1001), check(1001)]          # another user: 6 in all
        await settle()
        with pytest.raises(DBusError):
            await check(1002)
        assert len(polkit.pending) == 6              # polkit was asked for none of the refused
        for _ in range(6):
            polkit.answer(True)
        await asyncio.gather(*first, *others)        # authorized
        assert a._checking == {}
        task = check(1000)                            # room again
        await settle()
        polkit.answer(False)
        with pytest.raises(NotAuthorized, match="needs org.sharedd.Sharedd1.manage-shares"):
            await task
    asyncio.run(main())


def test_a_check_not_answered_in_time_is_cancelled_and_refused(monkeypatch):
    monkeypatch.setattr(authz, "CHECK_SECONDS", 0.1)
    polkit = Polkit()
    a = authz.Authorizer(polkit, Auditor(), mode="auto")   # (auto: polkit answering or not)

    async def main():
        with pytest.raises(NotAuthorized, match="did not answer within 0.1s"):
            await a.check(":1.1000", "org.sharedd.Sharedd1.Manager", "CreateShare",
                          interactive=False)
        (asked, _), = polkit.pending
        (cancel,) = polkit.sent
        assert cancel.member == "CancelCheckAuthorization"
        assert cancel.body == [asked.body[-1]] and asked.body[-1].startswith("sharedd-")
        assert a._checking == {}
    asyncio.run(main())


def test_the_audit_names_the_unit_the_system_made_not_a_users_own():
    from sharedd.bus.audit import unit_in
    assert unit_in("0::/system.slice/ssh.service\n") == "ssh.service"
    assert unit_in("0::/user.slice/user-1000.slice/session-3.scope\n") == "session-3.scope"
    # `systemd-run --user --unit=cron ...`: user 1000's manager names it
    assert unit_in("0::/user.slice/user-1000.slice/user@1000.service/app.slice/cron.service\n"
                   ) == "user@1000.service"
    assert unit_in("0::/system.slice/docker-1f2e.scope/system.slice/sshd.service\n") \
        == "docker-1f2e.scope"
    assert unit_in("0::/\n") == "" and unit_in("1:name=x:/a.service\n") == ""


def test_a_users_refused_calls_beyond_ten_a_minute_are_one_audit_record(monkeypatch, tmp_path):
    """Records go to a datagram socket standing for journald's: a uid's
    refused calls beyond REFUSED_RECORDS an interval are counted into one
    record at its end; calls that were not refused are all recorded."""
    import socket
    from dbus_next import Variant
    from sharedd.bus import audit

    monkeypatch.setattr(audit, "REFUSED_INTERVAL", 0.3)
    journal = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(journal)
    sock.setblocking(False)

    class Bus:
        async def call(self, msg):
            uid = int(msg.body[0].split(".")[-1])
            return type("Reply", (), {"message_type": MessageType.METHOD_RETURN, "body": [
                {"UnixUserID": Variant("u", uid), "ProcessID": Variant("u", 1)}]})()

    def records():
        out = []
        while True:
            try:
                data = sock.recv(65536).decode()
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.splitlines()))

    async def main():
        a = audit.Auditor(Bus(), journal=journal)
        got = []      # (read as they come: the socket queues about ten)
        for i in range(25):
            await a.record(":1.1001", "Manager.CreateShare", "/o", [f"s{i}"],
                           "refused: NotAuthorized: needs ...")
            await a.record(":1.1002", "Manager.CreateShare", "/o", [f"s{i}"], "ok")
            got += records()
        await a.record(":1.1003", "Manager.CreateShare", "/o", [], "refused: InvalidArgument")
        await asyncio.sleep(0.5)
        return got + records()
    got = asyncio.run(main())
    sock.close()
    by = {uid: [r for r in got if r["SHAREDD_CALLER_UID"] == uid] for uid in ("1001", "1002", "1003")}
    assert len(by["1002"]) == 25
    assert len(by["1003"]) == 1 and "SHAREDD_REFUSED_NOT_RECORDED" not in by["1003"][0]
    assert len(by["1001"]) == 11, by["1001"]
    summary = by["1001"][-1]
    assert summary["SHAREDD_REFUSED_NOT_RECORDED"] == "15"
    assert "15 more refused call(s) by uid 1001" in summary["MESSAGE"]
    assert all(r["SHAREDD_ARGS"] == f"s{i}" for i, r in enumerate(by["1001"][:10]))
