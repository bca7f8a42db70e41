"""The hook/spool record: one versioned schema shared by sharedd and mountd.

SCHEMA below is the single source of truth. It is a JSON Schema (draft 7)
document; schema/spool-record.schema.json is generated from it
(`python3 -m sharedd.record > schema/spool-record.schema.json`) and a test
checks that the two agree. validate() implements the subset of JSON Schema
used here, so neither daemon needs a JSON Schema library at run time.

Records never carry secrets.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, List, Sequence

from .errors import InvalidArgument
from . import validation
from .constants import (ACCESS_LEVELS, ACCESS_TYPES, GROUP_STATUSES, HOOK_METHODS, HOOK_PHASES,
                        MAX_ANON_ID, MAX_EXPORTED_SNAPSHOTS, MAX_GROUP_MEMBERS,
                        MAX_SNAPSHOT_ACCESS_RULES,
                        MAX_ACCESS_RULES_PER_SHARE, MAX_RECORD_WARNINGS, PROTOCOLS,
                        REPLICA_ROLES, REPLICA_STATES, REPLICA_STATUSES, REPLICATION_STYLES,
                        RULE_STATES, SERVER_STATUSES, SHARE_NAME_PATTERN, SHARE_STATUSES,
                        SQUASH_MODES)

#: the version sharedd writes; 2 added signature, server_addresses, part and
#: parts (and the rules' squash options); readers also take 1 (an older sharedd)
SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)
#: spool files larger than this are refused unread
MAX_RECORD_BYTES = 4 * 1024 * 1024
#: the parts one periodic state may be split into (sharedd.hooks.records)
MAX_PERIODIC_PARTS = 10000
#: spool file names: <seq, 20 digits>-<phase>-<method>.json
FILE_NAME_RE = re.compile(r"^(\d{20})-(pre|post|periodic)-([a-z_]+)\.json$")
HOST_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
HOST_ID_RE = rf"^{HOST_ID}$(?!\n)"
ID_RE = r"^[0-9a-f]{32}$(?!\n)"
# host:/path, host an IPv4 address, a bracketed IPv6 address or a DNS name;
# the path is absolute and has no characters a mount helper could misread.
EXPORT_RE = (r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):"
             r"/[A-Za-z0-9._/-]{0,1023}$(?!\n)")
# An address a server declares it serves from: IPv4, IPv6 (unbracketed) or DNS name.
SERVER_ADDRESS_RE = r"^([0-9A-Fa-f:.]{2,45}|[A-Za-z0-9][A-Za-z0-9.-]{0,252})$(?!\n)"
# Share and snapshot names, as sharedd's validation accepts them
NAME_RE = SHARE_NAME_PATTERN + r"(?!\n)"
# The "signature" member (sharedd.signing): key id = 16 hex of sha256(public key)
KEY_ID_RE = r"^[0-9a-f]{16}$(?!\n)"
SIGNATURE_RE = r"^[A-Za-z0-9+/]{86}==$(?!\n)"     # 64 bytes, base64
# Mount options travel as separate list items; each one is a plain word.
MOUNT_OPTION_RE = r"^[A-Za-z0-9_.=:/-]{1,256}$(?!\n)"

_rule = {
    "type": "object",
    "required": ["id", "access_type", "access_to", "access_level", "state"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "access_type": {"enum": list(ACCESS_TYPES)},
        # checked in sharedd's canonical form by validate() (sharedd.validation)
        "access_to": {"type": "string", "minLength": 1, "maxLength": 255},
        "access_level": {"enum": list(ACCESS_LEVELS)},
        "state": {"enum": list(RULE_STATES)},
        # NFS rules: what the server makes of the client's root (and uids)
        "squash": {"enum": list(SQUASH_MODES)},
        "anonuid": {"type": "integer", "minimum": 0, "maximum": MAX_ANON_ID},
        "anongid": {"type": "integer", "minimum": 0, "maximum": MAX_ANON_ID},
    },
}

_mount_hints = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "fstype": {"enum": ["nfs4", "nfs", "glusterfs", "cifs"]},
        "export": {"type": "string", "pattern": EXPORT_RE},
        "options": {"type": "array", "maxItems": 32,
                    "items": {"type": "string", "pattern": MOUNT_OPTION_RE}},
        # GlusterFS: the client must present a certificate to mount.
        "client_certificate_required": {"type": "boolean"},
    },
}

# A snapshot clients may mount, read-only (its share's exported snapshots)
_snapshot_export = {
    "type": "object",
    "required": ["id", "name", "export_locations", "access_rules", "mount_hints"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "name": {"type": "string", "pattern": NAME_RE},
        "export_locations": {"type": "array", "maxItems": 16,
                             "items": {"type": "string", "maxLength": 1300}},
        "access_rules": {"type": "array", "maxItems": MAX_SNAPSHOT_ACCESS_RULES, "items": _rule},
        "mount_hints": _mount_hints,
    },
}

_share = {
    "type": "object",
    "required": ["id", "name", "protocol", "export_locations", "size_gib",
                 "status", "access_rules", "mount_hints"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "name": {"type": "string", "pattern": NAME_RE},
        "backend": {"type": "string", "pattern": HOST_ID_RE},
        "protocol": {"enum": list(PROTOCOLS)},
        "export_locations": {"type": "array", "maxItems": 16,
                             "items": {"type": "string", "maxLength": 1300}},
        "size_gib": {"type": "integer", "minimum": 0},
        "status": {"enum": list(SHARE_STATUSES) + ["deleted"]},
        # The share's full rule set after the change, with states.
        "access_rules": {"type": "array", "maxItems": MAX_ACCESS_RULES_PER_SHARE, "items": _rule},
        "mount_hints": _mount_hints,
        # the share server that exports it (backends that handle share servers)
        "share_server": {"type": "string", "pattern": ID_RE},
        # the share group it belongs to
        "share_group": {"type": "string", "pattern": ID_RE},
        # its snapshots that have access rules (mountable snapshots)
        "snapshots": {"type": "array", "maxItems": MAX_EXPORTED_SNAPSHOTS,
                      "items": _snapshot_export},
    },
}

_snapshot = {
    "type": "object",
    "required": ["id", "name", "status", "size_gib"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "name": {"type": "string", "pattern": NAME_RE},
        "status": {"enum": list(SHARE_STATUSES) + ["deleted"]},
        "size_gib": {"type": "integer", "minimum": 0},
    },
}

_server = {
    "type": "object",
    "required": ["id", "share_network", "status", "addresses"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "share_network": {"type": "string", "pattern": ID_RE},
        "status": {"enum": list(SERVER_STATUSES) + ["deleted"]},
        "addresses": {"type": "array", "maxItems": 16,
                      "items": {"type": "string", "pattern": SERVER_ADDRESS_RE}},
    },
}

_replica = {
    "type": "object",
    "required": ["id", "backend", "role", "status", "state", "style", "export_locations"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "backend": {"type": "string", "pattern": HOST_ID_RE},
        "role": {"enum": list(REPLICA_ROLES)},
        "status": {"enum": list(REPLICA_STATUSES) + ["deleted"]},
        "state": {"enum": list(REPLICA_STATES)},
        "style": {"enum": list(REPLICATION_STYLES)},
        # a readable replica's read-only exports ([] for dr and the active)
        "export_locations": {"type": "array", "maxItems": 16,
                             "items": {"type": "string", "maxLength": 1300}},
    },
}

_group = {
    "type": "object",
    "required": ["id", "name", "status", "shares"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "name": {"type": "string", "pattern": NAME_RE},
        "status": {"enum": list(GROUP_STATUSES) + ["deleted"]},
        "shares": {"type": "array", "maxItems": MAX_GROUP_MEMBERS,
                   "items": {"type": "string", "pattern": ID_RE}},
    },
}

_group_snapshot = {
    "type": "object",
    "required": ["id", "name", "share_group", "status", "members"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "name": {"type": "string", "pattern": NAME_RE},
        "share_group": {"type": "string", "pattern": ID_RE},
        "status": {"enum": list(GROUP_STATUSES) + ["deleted"]},
        # one snapshot of each member share
        "members": {"type": "array", "maxItems": MAX_GROUP_MEMBERS, "items": {
            "type": "object", "required": ["snapshot", "share"], "additionalProperties": False,
            "properties": {"snapshot": {"type": "string", "pattern": ID_RE},
                           "share": {"type": "string", "pattern": ID_RE}}}},
    },
}

SCHEMA: Dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "$id": "https://sharedd.invalid/schema/spool-record-2.json",
    "title": "sharedd hook record",
    "type": "object",
    "required": ["schema", "host", "epoch", "seq", "timestamp", "phase",
                 "method", "backend", "share", "access_rules",
                 "is_allow_operation"],
    "additionalProperties": False,
    "properties": {
        "schema": {"enum": list(READ_VERSIONS)},
        "host": {"type": "string", "pattern": HOST_ID_RE},
        # Changes when sharedd's state database is recreated: seq restarts.
        "epoch": {"type": "string", "pattern": ID_RE},
        "seq": {"type": "integer", "minimum": 1, "maximum": 10 ** 20 - 1},
        "timestamp": {"type": "string",
                      "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$(?!\n)"},
        "phase": {"enum": list(HOOK_PHASES)},
        "method": {"enum": list(HOOK_METHODS)},
        "backend": {"type": "string", "pattern": HOST_ID_RE},
        # The share concerned (null for periodic and backend-wide records).
        "share": {"oneOf": [{"type": "null"}, _share]},
        "snapshot": {"oneOf": [{"type": "null"}, _snapshot]},
        # setup_server and delete_share_server: the server concerned.
        "share_server": _server,
        # replica methods (create/delete/promote/update_share_replica): the
        # replica concerned (after a promote: the new active)
        "replica": _replica,
        # share group methods: the group concerned (with its member shares),
        # and the group snapshot (its source, for a group made from one)
        "share_group": _group,
        "share_group_snapshot": _group_snapshot,
        # The rules this change concerns (allow/deny); [] otherwise.
        "access_rules": {"type": "array", "maxItems": MAX_ACCESS_RULES_PER_SHARE, "items": _rule},
        "is_allow_operation": {"type": ["boolean", "null"]},
        # post only: how the driver call ended.
        "result": {
            "type": "object",
            "required": ["ok"],
            "additionalProperties": False,
            "properties": {"ok": {"type": "boolean"},
                           "error": {"type": "string", "maxLength": 4096},
                           # hook failures that a revocation went on despite
                           "warnings": {"type": "array", "maxItems": MAX_RECORD_WARNINGS,
                                        "items": {"type": "string", "maxLength": 1000}}},
        },
        # The addresses the signing server serves exports from: every export
        # a reader mounts from this record names one of them.
        "server_addresses": {"type": "array", "maxItems": 64,
                             "items": {"type": "string", "pattern": SERVER_ADDRESS_RE}},
        # Ed25519 over the canonical form of everything else (sharedd.signing).
        "signature": {
            "type": "object",
            "required": ["algorithm", "key_id", "value"],
            "additionalProperties": False,
            "properties": {"algorithm": {"const": "ed25519"},
                           "key_id": {"type": "string", "pattern": KEY_ID_RE},
                           "value": {"type": "string", "pattern": SIGNATURE_RE}},
        },
        # periodic only: the full state of every share of the backend, split
        # into `parts` records with consecutive seqs (part 1 first) when large;
        # a reader uses a periodic state only once it holds every part.
        "shares": {"type": "array", "maxItems": 100000, "items": _share},
        "part": {"type": "integer", "minimum": 1, "maximum": MAX_PERIODIC_PARTS},
        "parts": {"type": "integer", "minimum": 1, "maximum": MAX_PERIODIC_PARTS},
    },
    # Cross-field rules; validate() checks them by hand with clear messages.
    "allOf": [
        {"if": {"properties": {"phase": {"const": "periodic"}}},
         "then": {"required": ["shares"]},
         "else": {"not": {"required": ["shares"]}}},
        {"if": {"properties": {"phase": {"const": "post"}}},
         "then": {"required": ["result"]}},
    ],
}


class RecordError(ValueError):
    """A record does not match the schema (message says where and why)."""


_TYPES: Dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}
_MISSING = object()


class _Fail(Exception):
    """Raised inside a compiled check; containers add where, outermost last."""

    def __init__(self, message: str, inner: Sequence["_Fail"] = ()):
        super().__init__(message)
        self.message = message
        self.inner = inner        # oneOf: why each form did not match
        self.path: List[str] = []

    def text(self, root: str) -> str:
        where = root + "".join(reversed(self.path))
        if self.inner:
            return (f"{where}: {self.message} "
                    f"({'; '.join(e.text(where) for e in self.inner)})")
        return f"{where}: {self.message}"


def _compile(schema: Dict[str, Any]) -> Callable[[Any], None]:
    """A checker for the JSON Schema subset SCHEMA uses, built once: records
    are checked on every write and every read (10,000 in a burst)."""
    if "oneOf" in schema:
        options = [_compile(o) for o in schema["oneOf"]]

        def one_of(v: Any) -> None:
            errors = []
            for option in options:
                try:
                    option(v)
                except _Fail as exc:
                    # without its traceback: that holds this frame, which
                    # holds errors (a cycle per record, left to the collector)
                    errors.append(exc.with_traceback(None))
            if len(errors) != len(options) - 1:
                raise _Fail("matches none of the allowed forms", errors)
        return one_of
    const = schema.get("const", _MISSING)
    enum = {(type(e), e) for e in schema["enum"]} if "enum" in schema else None
    names = schema.get("type")
    names = [names] if isinstance(names, str) else names
    types = [_TYPES[n] for n in names] if names else None
    # one type (the usual case) is one call, not a generator per value
    is_type = (types[0] if types and len(types) == 1
               else (lambda v: any(t(v) for t in types)) if types else None)
    min_len, max_len = schema.get("minLength", 0), schema.get("maxLength")
    # ASCII: \d and [0-9] must not admit other scripts' digits
    pattern = re.compile(schema["pattern"], re.ASCII) if "pattern" in schema else None
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    max_items = schema.get("maxItems")
    items = _compile(schema["items"]) if "items" in schema else None
    required = tuple(schema.get("required", ()))
    props = {k: _compile(v) for k, v in schema.get("properties", {}).items()}
    closed = schema.get("additionalProperties", True) is False

    def check(v: Any) -> None:
        if const is not _MISSING and (v != const or type(v) is not type(const)):
            raise _Fail(f"must be {const!r}")
        if enum is not None and (type(v), v) not in enum:
            raise _Fail(f"{v!r} is not one of {schema['enum']}")
        if is_type is not None and not is_type(v):
            raise _Fail(f"expected {' or '.join(names)}")
        if isinstance(v, str):
            if len(v) < min_len:
                raise _Fail("too short")
            if max_len is not None and len(v) > max_len:
                raise _Fail(f"longer than {max_len}")
            if pattern is not None and not pattern.search(v):
                raise _Fail(f"{v[:80]!r} does not match {schema['pattern']}")
        elif isinstance(v, int) and not isinstance(v, bool):
            if minimum is not None and v < minimum:
                raise _Fail(f"below {minimum}")
            if maximum is not None and v > maximum:
                raise _Fail(f"above {maximum}")
        elif isinstance(v, list):
            if max_items is not None and len(v) > max_items:
                raise _Fail(f"more than {max_items} items")
            if items is not None:
                for i, item in enumerate(v):
                    try:
                        items(item)
                    except _Fail as exc:
                        exc.path.append(f"[{i}]")
                        raise
        elif isinstance(v, dict):
            for key in required:
                if key not in v:
                    raise _Fail(f"missing {key!r}")
            for key, item in v.items():
                sub = props.get(key)
                if sub is not None:
                    try:
                        sub(item)
                    except _Fail as exc:
                        exc.path.append(f".{key}")
                        raise
                elif closed:
                    raise _Fail(f"unexpected key {str(key)[:40]!r}")
    return check


_CHECKS: Dict[int, Callable[[Any], None]] = {}


def _check(value: Any, schema: Dict[str, Any], where: str) -> None:
    """Raise RecordError unless value matches schema (a part of SCHEMA)."""
    checker = _CHECKS.get(id(schema))
    if checker is None:
        checker = _CHECKS[id(schema)] = _compile(schema)
    try:
        checker(value)
    except _Fail as exc:
        raise RecordError(exc.text(where)) from None


def validate(record: Any) -> Dict[str, Any]:
    """Raise RecordError unless record matches SCHEMA; return it."""
    _check(record, SCHEMA, "record")
    phase = record["phase"]
    if phase == "periodic" and "shares" not in record:
        raise RecordError("record: a periodic record must carry 'shares'")
    if phase != "periodic" and "shares" in record:
        raise RecordError("record: only periodic records carry 'shares'")
    if phase == "post" and "result" not in record:
        raise RecordError("record: a post record must carry 'result'")
    if ("part" in record or "parts" in record) and phase != "periodic":
        raise RecordError("record: only periodic records have parts")
    if record.get("part", 1) > record.get("parts", 1):
        raise RecordError(f"record: part {record.get('part')} of {record.get('parts', 1)}")
    for where, rules in _rule_lists(record):
        for i, r in enumerate(rules):
            try:
                canonical = validation.access_to(r["access_type"], r["access_to"])
            except InvalidArgument as exc:
                raise RecordError(f"{where}[{i}].access_to: {exc}") from None
            if canonical != r["access_to"]:
                raise RecordError(f"{where}[{i}].access_to: {r['access_to']!r} is not in "
                                  f"sharedd's form ({canonical!r})")
    return record


def _rule_lists(record: Dict[str, Any]):
    yield "record.access_rules", record["access_rules"]
    shares = [("record.share", record["share"])] if record.get("share") else []
    shares += [(f"record.shares[{i}]", s) for i, s in enumerate(record.get("shares", ()))]
    for where, share in shares:
        yield f"{where}.access_rules", share["access_rules"]
        for j, snap in enumerate(share.get("snapshots", ())):
            yield f"{where}.snapshots[{j}].access_rules", snap["access_rules"]


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise RecordError(f"record: key {key[:40]!r} appears twice in one object")
        obj[key] = value
    return obj


#: what a reader needs to order and fold records before it validates them in full
META_FIELDS = ("schema", "host", "epoch", "seq", "timestamp", "phase", "method", "backend",
               "part", "parts")


def check_meta(record: Any) -> Dict[str, Any]:
    """Raise RecordError unless the fields that order and fold a record
    (META_FIELDS, and the share's id and status) match SCHEMA: a reader can
    then fold thousands of records and validate in full (validate()) only
    those it acts on."""
    if not isinstance(record, dict):
        raise RecordError("record: expected object")
    props = SCHEMA["properties"]
    for key in META_FIELDS:
        if key in record:
            _check(record[key], props[key], f"record.{key}")
        elif key in SCHEMA["required"]:
            raise RecordError(f"record: missing {key!r}")
    share = record.get("share")
    if share is not None:
        if not isinstance(share, dict):
            raise RecordError("record.share: expected null or object")
        for key in ("id", "status"):
            if key not in share:
                raise RecordError(f"record.share: missing {key!r}")
            _check(share[key], _share["properties"][key], f"record.share.{key}")
    return record


def loads(data: bytes, full: bool = True) -> Dict[str, Any]:
    """Parse and validate one record from bytes (size-capped, JSON only);
    full=False: check_meta() only."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record: larger than {MAX_RECORD_BYTES} bytes")
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecordError:
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"record: not valid JSON: {exc}") from None
    except RecursionError:
        raise RecordError("record: not valid JSON: nested too deeply") from None
    return validate(obj) if full else check_meta(obj)


class Checked(dict):  # type: ignore[type-arg]
    """A record that passed validate(), as hooks get it (HookManager.finish
    checks each record once; the built-in hooks do not check it again, so a
    hook must not change the record it is given)."""


def checked(record: Any) -> Checked:
    """record, validated unless it already was (RecordError if invalid)."""
    if isinstance(record, Checked):
        return record
    return Checked(validate(record))


def dumps(record: Dict[str, Any]) -> bytes:
    # One line: with indent, json uses its Python encoder, whose nested
    # functions make a reference cycle at every call (two records per
    # operation); `jq . FILE` shows it indented.
    return json.dumps(checked(record), sort_keys=True).encode() + b"\n"


def mount_export(share: Dict[str, Any]) -> str:
    """The host:/path a client mounts a record's share from ("" if none)."""
    hints = share.get("mount_hints") or {}
    if hints.get("export"):
        return str(hints["export"])
    return next((e for e in share.get("export_locations", ())
                 if re.fullmatch(EXPORT_RE, e, re.ASCII)), "")


def export_host(export: str) -> str:
    """The host part of host:/path (brackets of an IPv6 address removed)."""
    m = re.fullmatch(EXPORT_RE, export, re.ASCII)
    return m.group(1).strip("[]") if m else ""


def file_name(record: Dict[str, Any]) -> str:
    """Spool file name; names sort in sequence order."""
    return f"{record['seq']:020d}-{record['phase']}-{record['method']}.json"


def schema_json() -> str:
    return json.dumps(SCHEMA, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(schema_json(), end="")
