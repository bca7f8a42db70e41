"""Collect D-Bus signals from a bus in a background thread (dbus-next)."""

import asyncio
import threading
import time


class SignalCollector:
    def __init__(self, address: str, match_rule: str):
        self.messages = []
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self._stop = None
        self.thread = threading.Thread(target=self._run, args=(address, match_rule), daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "could not subscribe to signals"

    def _run(self, address, rule):
        from dbus_next import Message, MessageType
        from dbus_next.aio import MessageBus
        asyncio.set_event_loop(self.loop)

        async def main():
            bus = await MessageBus(bus_address=address).connect()
            await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="AddMatch",
                                   signature="s", body=[rule]))
            bus.add_message_handler(
                lambda m: self.messages.append(m) if m.message_type == MessageType.SIGNAL else None)
            self._stop = asyncio.Event()
            self.ready.set()
            await self._stop.wait()
            bus.disconnect()
        self.loop.run_until_complete(main())

    def wait_for(self, n: int, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.messages)

    def close(self):
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)
