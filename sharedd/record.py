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
from typing import Any, Dict

from .constants import (ACCESS_LEVELS, ACCESS_TYPES, HOOK_METHODS, HOOK_PHASES, MAX_ANON_ID,
                        MAX_ACCESS_RULES_PER_SHARE, MAX_RECORD_WARNINGS, PROTOCOLS,
                        RULE_STATES, SHARE_STATUSES, SQUASH_MODES)

SCHEMA_VERSION = 1
#: spool files larger than this are refused unread
MAX_RECORD_BYTES = 4 * 1024 * 1024
#: spool file names: <seq, 20 digits>-<phase>-<method>.json
FILE_NAME_RE = re.compile(r"^(\d{20})-(pre|post|periodic)-([a-z_]+)\.json$")
HOST_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$(?!\n)"
ID_RE = r"^[0-9a-f]{32}$(?!\n)"
# host:/path, host an IPv4 address, a bracketed IPv6 address or a DNS name;
# the path is absolute and has no characters a mount helper could misread.
EXPORT_RE = (r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):"
             r"/[A-Za-z0-9._/-]{0,1023}$(?!\n)")
# Mount options travel as separate list items; each one is a plain word.
MOUNT_OPTION_RE = r"^[A-Za-z0-9_.=:/-]{1,256}$(?!\n)"

_rule = {
    "type": "object",
    "required": ["id", "access_type", "access_to", "access_level", "state"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "access_type": {"enum": list(ACCESS_TYPES)},
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

_share = {
    "type": "object",
    "required": ["id", "name", "protocol", "export_locations", "size_gib",
                 "status", "access_rules", "mount_hints"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$(?!\n)"},
        "backend": {"type": "string", "pattern": HOST_ID_RE},
        "protocol": {"enum": list(PROTOCOLS)},
        "export_locations": {"type": "array", "maxItems": 16,
                             "items": {"type": "string", "maxLength": 1300}},
        "size_gib": {"type": "integer", "minimum": 0},
        "status": {"enum": list(SHARE_STATUSES) + ["deleted"]},
        # The share's full rule set after the change, with states.
        "access_rules": {"type": "array", "maxItems": MAX_ACCESS_RULES_PER_SHARE, "items": _rule},
        "mount_hints": _mount_hints,
    },
}

_snapshot = {
    "type": "object",
    "required": ["id", "name", "status", "size_gib"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_RE},
        "name": {"type": "string", "maxLength": 255},
        "status": {"enum": list(SHARE_STATUSES) + ["deleted"]},
        "size_gib": {"type": "integer", "minimum": 0},
    },
}

SCHEMA: Dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "$id": "https://sharedd.invalid/schema/spool-record-1.json",
    "title": "sharedd hook record",
    "type": "object",
    "required": ["schema", "host", "epoch", "seq", "timestamp", "phase",
                 "method", "backend", "share", "access_rules",
                 "is_allow_operation"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
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
        # periodic only: the full state of every share of the backend.
        "shares": {"type": "array", "maxItems": 100000, "items": _share},
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


_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _check(value: Any, schema: Dict[str, Any], where: str) -> None:
    if "oneOf" in schema:
        errors = []
        for option in schema["oneOf"]:
            try:
                _check(value, option, where)
            except RecordError as exc:
                errors.append(str(exc))
        if len(errors) != len(schema["oneOf"]) - 1:
            raise RecordError(f"{where}: matches none of the allowed forms"
                              f" ({'; '.join(errors)})")
        return
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        raise RecordError(f"{where}: must be {schema['const']!r}")
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        raise RecordError(f"{where}: {value!r} is not one of {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            raise RecordError(f"{where}: expected {' or '.join(types)}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise RecordError(f"{where}: too short")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise RecordError(f"{where}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise RecordError(f"{where}: {value[:80]!r} does not match {schema['pattern']}")
    if _is_type(value, "integer") and "minimum" in schema and value < schema["minimum"]:
        raise RecordError(f"{where}: below {schema['minimum']}")
    if _is_type(value, "integer") and "maximum" in schema and value > schema["maximum"]:
        raise RecordError(f"{where}: above {schema['maximum']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise RecordError(f"{where}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            _check(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                raise RecordError(f"{where}: missing {key!r}")
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                _check(item, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties", True) is False:
                raise RecordError(f"{where}: unexpected key {key[:40]!r}")


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
    return record


def loads(data: bytes) -> Dict[str, Any]:
    """Parse and validate one record from bytes (size-capped, JSON only)."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record: larger than {MAX_RECORD_BYTES} bytes")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"record: not valid JSON: {exc}") from None
    except RecursionError:
        raise RecordError("record: not valid JSON: nested too deeply") from None
    return validate(obj)


def dumps(record: Dict[str, Any]) -> bytes:
    return json.dumps(validate(record), sort_keys=True, indent=1).encode() + b"\n"


def file_name(record: Dict[str, Any]) -> str:
    """Spool file name; names sort in sequence order."""
    return f"{record['seq']:020d}-{record['phase']}-{record['method']}.json"


def schema_json() -> str:
    return json.dumps(SCHEMA, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(schema_json(), end="")
