"""Process life cycle: start-up, systemd notification, watchdog, reload, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any, List

from . import collector
from . import config as config_mod
from .engine import Engine
from .errors import AlreadyRunning, ConfigError, SharedError
from .notify import Notifier

log = logging.getLogger("sharedd")


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


async def run(config_path: str, cfg: config_mod.Config) -> int:
    from .bus.service import BusService, StartupError as BusStartupError
    notifier = Notifier()
    notifier.notify("STATUS=starting: connecting to the system bus")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    for text in config_mod.warnings(cfg):
        log.warning("configuration: %s", text)
    service = BusService()
    engine = Engine(cfg, observer=service)
    try:
        await service.connect()
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot connect to the system bus: {exc}") from None
    notifier.notify("STATUS=starting: setting up backends and recovering state")
    progress = asyncio.create_task(_starting(notifier, engine))
    try:
        await engine.start()
    except AlreadyRunning as exc:
        raise StartupError(str(exc)) from None
    except SharedError:
        if not engine.state_failure():
            raise
    finally:
        progress.cancel()
    if engine.state_failure():     # start-up stopped at it (StateLost), or went on past it
        raise StartupError(engine.state_failure())
    try:
        await service.publish(engine)
    except BusStartupError as exc:
        raise StartupError(str(exc)) from None
    with collector.short_pauses():
        return await _serve(config_path, notifier, engine, service, stop)


async def _serve(config_path: str, notifier: Notifier, engine: Engine, service: Any,
                 stop: asyncio.Event) -> int:
    """Ready: serve until told to stop (or until the bus or the state disk
    is lost); the exit code."""
    loop = asyncio.get_running_loop()
    notifier.notify("READY=1")
    status = engine.status()
    notifier.notify(f"STATUS={status}")
    log.info("sharedd ready on the system bus: %s", status)

    def reload() -> None:
        notifier.notify("RELOADING=1")
        try:
            new = config_mod.load(config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
        else:
            logging.getLogger().setLevel(new.log_level.upper())
            pending = engine.reload(new)
            if pending:
                log.warning("reloaded; these changes take effect after a restart: %s",
                            ", ".join(pending))
            else:
                log.info("configuration reloaded")
        notifier.notify("READY=1")
    loop.add_signal_handler(signal.SIGHUP, reload)

    failed: List[str] = []     # why sharedd stops on its own: exit non-zero
    tasks = [asyncio.create_task(_watchdog(notifier, engine, service)),
             asyncio.create_task(_bus_lost(service, stop, failed)),
             asyncio.create_task(_state_lost(engine, stop, failed)),
             asyncio.create_task(collector.thaw_when_due(service.bus.idle))]
    await stop.wait()
    notifier.notify("STOPPING=1")
    notifier.notify("STATUS=stopping")
    log.info("stopping")
    for t in tasks:
        t.cancel()
    await service.close()
    await engine.stop()
    return 1 if failed or engine.state_failure() else 0


async def _watchdog(notifier: Notifier, engine: Engine, service: Any) -> None:
    """Ping from the event loop, and only while our own bus round trip works:
    a stalled loop or a dead connection stops the pings and systemd restarts
    us. Also refresh STATUS= when it changes."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if os.environ.get("WATCHDOG_PID") not in (None, str(os.getpid())):
        usec = 0
    interval = usec / 2e6 if usec else 5.0
    last = None
    while True:
        if usec and await service.alive(timeout=interval):
            notifier.notify("WATCHDOG=1")
        status = engine.status()
        if status != last:
            last = status
            notifier.notify(f"STATUS={last}")
        await asyncio.sleep(interval)


async def _starting(notifier: Notifier, engine: Engine) -> None:
    """STATUS= progress while start-up recovery and ensure run (thousands of
    shares take a while)."""
    while True:
        await asyncio.sleep(1.0)
        notifier.notify(f"STATUS=starting: {engine.status()}")


async def _bus_lost(service: Any, stop: asyncio.Event, failed: List[str]) -> None:
    try:
        await service.bus.wait_for_disconnect()
    except Exception as exc:   # a connection that failed is lost all the same
        log.error("the system bus connection failed: %s", exc)
    if not stop.is_set():
        log.error("lost the connection to the system bus; exiting so systemd restarts us")
        failed.append("bus")
        stop.set()


async def _state_lost(engine: Engine, stop: asyncio.Event, failed: List[str]) -> None:
    why = await engine.state_lost()
    if not stop.is_set():
        log.critical("%s; exiting so systemd restarts us", why)
        failed.append("state")
        stop.set()
