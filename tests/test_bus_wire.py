"""sharedd.bus.wire writes exactly the bytes dbus-next writes: every
signature the daemons use and more, random values, every alignment, and
whole messages of every type; what it cannot write goes to the library."""

import random
import string

from dbus_next import Message
from dbus_next._private.marshaller import Marshaller
from dbus_next.constants import MessageFlag, MessageType
from dbus_next.signature import SignatureTree, Variant

from sharedd.bus.wire import marshal, writer


def random_value(rng, sig, depth=0):
    word = "".join(rng.choice(string.ascii_letters + "äé€") for _ in range(rng.randint(0, 9)))
    if sig in "so":
        return "/" + word.encode("ascii", "ignore").decode() if sig == "o" else word
    if sig == "g":
        return rng.choice(["", "s", "a{sv}", "(tt)"])
    if sig == "b":
        return rng.random() < 0.5
    bits = {"y": (0, 255), "n": (-2**15, 2**15 - 1), "q": (0, 2**16 - 1), "i": (-2**31, 2**31 - 1),
            "u": (0, 2**32 - 1), "x": (-2**63, 2**63 - 1), "t": (0, 2**64 - 1)}
    if sig in bits:
        return rng.randint(*bits[sig])
    if sig == "d":
        return rng.uniform(-1e9, 1e9)
    if sig == "v":
        inner = rng.choice(SIGS)
        return Variant(inner, random_value(rng, inner, depth + 1))
    if sig == "ay":          # the library takes bytes here
        return bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 5)))
    if sig.startswith("a{"):
        k, v = sig[2], sig[3:-1]
        return {random_value(rng, k): random_value(rng, v, depth + 1)
                for _ in range(rng.randint(0, 3 if depth < 2 else 0))}
    if sig.startswith("a"):
        return [random_value(rng, sig[1:], depth + 1) for _ in range(rng.randint(0, 3 if depth < 2 else 0))]
    if sig.startswith("("):
        return [random_value(rng, c, depth + 1) for c in _split(sig[1:-1])]
    raise AssertionError(sig)


def _split(inner):
    return [t.signature for t in SignatureTree._get(inner).types]


SIGS = ["s", "o", "g", "b", "y", "n", "q", "i", "u", "x", "t", "d", "v", "as", "ao", "at", "ay",
        "a(sssss)", "a{ss}", "a{sv}", "(yt)", "a(yv)", "aas", "a{sa{sv}}", "(bbd)"]


def test_writers_write_the_librarys_bytes():
    rng = random.Random(7)
    for _ in range(3000):
        sig = rng.choice(SIGS)
        value = random_value(rng, sig)
        lead = "y" * rng.randint(0, 7)          # start at every alignment
        ref = Marshaller(lead + sig, [1] * len(lead) + [value])
        ref.marshall()
        buf = bytearray(b"\x01" * len(lead))
        writer(sig)(buf, value)
        assert bytes(buf) == bytes(ref.buffer), (sig, value, len(lead))


def test_messages_are_the_librarys_bytes():
    rng = random.Random(5)
    for n in range(2000):
        kind = rng.choice(list(MessageType))
        sigs = [rng.choice(SIGS) for _ in range(rng.randint(0, 3))]
        kw = dict(message_type=kind, serial=rng.randint(1, 2**32 - 1),
                  flags=rng.choice([MessageFlag.NONE, MessageFlag.NO_REPLY_EXPECTED]),
                  signature="".join(sigs), body=[random_value(rng, s) for s in sigs])
        if kind in (MessageType.METHOD_CALL, MessageType.SIGNAL):
            kw.update(path="/org/sharedd/Sharedd1/share/" + "ab" * rng.randint(1, 16),
                      interface="org.sharedd.Sharedd1.Share", member="PropertiesChanged")
        if kind in (MessageType.METHOD_RETURN, MessageType.ERROR):
            kw["reply_serial"] = rng.randint(1, 2**32 - 1)
        if kind == MessageType.ERROR:
            kw["error_name"] = "org.sharedd.Sharedd1.Error.NotFound"
        if rng.random() < 0.7:
            kw["destination"] = rng.choice([":1.42", "org.ganesha.nfsd"])
        msg = Message(**kw)
        assert marshal(msg) == bytes(msg._marshall()), kw


def test_what_it_cannot_write_goes_to_the_library():
    bad = [Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, serial=2,
                   signature="t", body=[-1]),                         # out of range
           Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, serial=2,
                   signature="s", body=["a\0b"]),                      # NUL in a string
           Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, serial=2,
                   signature="ss", body=["only one"]),
           Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, serial=2,
                   signature="s", body=["\udcff"])]                    # not UTF-8
    for msg in bad:
        assert marshal(msg) is None
