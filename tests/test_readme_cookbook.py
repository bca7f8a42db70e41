"""Every busctl line of the README is a command that can work as written:
the method or property exists on the interface (the checked-in
introspection XML, which tests/test_introspection.py compares with the
running daemon), the arguments parse against the method's signature the way
busctl reads them, and every backend a line names is one the shipped
configuration (etc/sharedd.conf) enables."""

from __future__ import annotations

import configparser
import glob
import pathlib
import re
import shlex
import xml.etree.ElementTree as ET
from typing import Dict, Iterator, List, Tuple

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DEST = "org.sharedd.Sharedd1"
#: what the README's placeholders stand for
PLACEHOLDERS = {"<id>": "0123456789abcdef0123456789abcdef",
                "<access_id>": "fedcba9876543210fedcba9876543210",
                "<id from SpoolExport>": "0123456789abcdef0123456789abcdef"}


def interfaces() -> Dict[str, Tuple[Dict[str, str], set]]:
    """interface -> ({method: in-signature}, {property})"""
    out = {}
    for path in glob.glob(str(REPO / "dbus" / "org.sharedd.Sharedd1.*.xml")):
        for iface in ET.parse(path).getroot().iter("interface"):
            methods = {m.get("name"): "".join(a.get("type") for a in m.iter("arg")
                                              if a.get("direction", "in") == "in")
                       for m in iface.iter("method")}
            out[iface.get("name")] = (methods, {p.get("name") for p in iface.iter("property")})
    return out


def shipped_backends() -> List[str]:
    cp = configparser.ConfigParser(inline_comment_prefixes=("#",))
    cp.read(REPO / "etc" / "sharedd.conf")
    return [b.strip() for b in cp["DEFAULT"]["enabled_share_backends"].split(",") if b.strip()]


def readme_commands(placeholders: Dict[str, str] = PLACEHOLDERS
                    ) -> Iterator[Tuple[int, List[str]]]:
    """(line number, argv) of every busctl command in the README's code
    blocks, continuation lines joined, $B/$M/$S expanded ($P and $N, the
    paths named in the text, are left as they are), placeholders replaced
    from placeholders."""
    text = (REPO / "README.md").read_text()
    variables: Dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        i += 1
        if not line.startswith("    "):
            continue
        stripped = line.strip()
        m = re.fullmatch(r'([A-Z])=(".*"|\S+)', stripped)
        if m:
            variables[m.group(1)] = m.group(2).strip('"')
            continue
        if not (stripped.startswith("$B ") or stripped.startswith("busctl ")):
            continue
        for key, value in placeholders.items():
            stripped = stripped.replace(key, value)
        argv = shlex.split(stripped, comments=True)
        expanded: List[str] = []
        for word in argv:
            if word.startswith("$") and word[1:] in variables:
                expanded += shlex.split(variables[word[1:]])
            else:
                expanded.append(word)
        yield number, expanded


def path_variables() -> Dict[str, str]:
    """The object paths the README names in text: (`P=/org/...`)."""
    text = (REPO / "README.md").read_text()
    return {k: v.replace("<id>", PLACEHOLDERS["<id>"])
            for k, v in re.findall(r"`([A-Z])=(/org/sharedd/[^`]+)`", text)}


def parse_args(sig: str, args: List[str]) -> List[str]:
    """Consume args as busctl reads sig; return what is left (raises on a
    value that does not fit)."""
    types = split_signature(sig)
    for t in types:
        args = parse_one(t, args)
    return args


def split_signature(sig: str) -> List[str]:
    out, i = [], 0
    while i < len(sig):
        j = complete_type_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def complete_type_end(sig: str, i: int) -> int:
    c = sig[i]
    if c == "a":
        return complete_type_end(sig, i + 1)
    if c in "({":
        close = ")" if c == "(" else "}"
        i += 1
        while sig[i] != close:
            i = complete_type_end(sig, i)
        return i + 1
    return i + 1


def parse_one(t: str, args: List[str]) -> List[str]:
    assert args, f"missing a value of type {t}"
    if t in "ynqiuxt":
        value = int(args[0])
        assert value >= 0 or t in "nix", f"{t} value {value} is negative"
        return args[1:]
    if t == "b":
        assert args[0] in ("true", "false", "yes", "no", "1", "0"), args[0]
        return args[1:]
    if t == "d":
        float(args[0])
        return args[1:]
    if t in "sg":
        return args[1:]
    if t == "o":
        assert re.fullmatch(r"/[A-Za-z0-9_/]*", args[0]), f"{args[0]!r} is not an object path"
        return args[1:]
    if t == "v":
        return parse_one(args[0], args[1:])
    if t.startswith("a"):
        count = int(args[0])
        args = args[1:]
        inner = t[1:]
        if inner.startswith("{"):
            key, value = split_signature(inner[1:-1])
            for _ in range(count):
                args = parse_one(value, parse_one(key, args))
        else:
            for _ in range(count):
                args = parse_one(inner, args)
        return args
    if t.startswith("("):
        for field in split_signature(t[1:-1]):
            args = parse_one(field, args)
        return args
    raise AssertionError(f"type {t} not handled")


def named_backends(argv: List[str]) -> List[str]:
    """Backends a command names: `backend s NAME` options, ManageShare's
    first argument, backend object paths."""
    out = [argv[i + 2] for i, w in enumerate(argv[:-2]) if w == "backend" and argv[i + 1] == "s"]
    if "ManageShare" in argv:
        out.append(argv[argv.index("ManageShare") + 2])
    out += [w.rsplit("/", 1)[1] for w in argv if w.startswith("/org/sharedd/Sharedd1/backend/")]
    return out


COMMANDS = list(readme_commands())


def test_the_readme_has_a_cookbook():
    assert len([c for c in COMMANDS if c[1][1] == "call"]) >= 30


@pytest.mark.parametrize("number,argv", COMMANDS, ids=[f"line{n}" for n, _ in COMMANDS])
def test_cookbook_line(number, argv):
    ifaces = interfaces()
    paths = path_variables()
    argv = [paths.get(w[1:], w) if w.startswith("$") else w for w in argv]
    assert argv[0] == "busctl", argv
    words = [w for w in argv[1:] if not w.startswith("-")]
    verb = words[0]
    assert all(w not in ("|", "...", "…") for w in argv), f"line {number}: not a command: {argv}"
    for backend in named_backends(argv):
        assert backend in shipped_backends(), \
            f"line {number}: backend {backend!r} is not in the shipped configuration"
    if verb in ("introspect", "monitor"):
        assert words[1] == DEST
        return
    assert words[1] == DEST, f"line {number}: destination {words[1]!r}"
    path, iface = words[2], words[3]
    assert path.startswith("/org/sharedd/Sharedd1"), f"line {number}: path {path!r}"
    assert iface in ifaces, f"line {number}: no interface {iface}"
    methods, props = ifaces[iface]
    if verb == "get-property":
        for prop in words[4:]:
            assert prop in props, f"line {number}: {iface} has no property {prop}"
        return
    assert verb == "call", f"line {number}: {verb}"
    method, sig = words[4], words[5]
    assert method in methods, f"line {number}: {iface} has no method {method}"
    assert sig == methods[method], f"line {number}: {method} takes {methods[method]}, not {sig}"
    rest = parse_args(sig, argv[argv.index(sig) + 1:])
    assert rest == [], f"line {number}: arguments left over: {rest}"
