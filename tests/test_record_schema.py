"""The record schema: committed JSON Schema file, golden examples, and the
agreement of the hand validator (sharedd.record.validate) with a real JSON
Schema implementation (Debian's python3-jsonschema, draft 7)."""

import json
import pathlib

import jsonschema
import pytest

from sharedd import record as rec

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "schema" / "examples"
INVALID = EXAMPLES / "invalid"
EXPECTED = json.loads((INVALID / "expected.json").read_text())

VALID_FILES = sorted(p.name for p in EXAMPLES.glob("*.json"))
INVALID_FILES = sorted(p.name for p in INVALID.glob("*.json") if p.name != "expected.json")
REQUIRED_VALID = {"pre-allow_access.json", "post-allow_access.json", "pre-deny_access.json",
                  "post-deny_access.json", "pre-delete_share.json", "post-create_share.json",
                  "periodic.json"}

VALIDATOR = jsonschema.Draft7Validator(rec.SCHEMA)


def load(path: pathlib.Path):
    return json.loads(path.read_text())


def example(name: str):
    return load(EXAMPLES / name)


def test_committed_schema_file_is_generated_from_code():
    assert (REPO / "schema" / "spool-record.schema.json").read_text() == rec.schema_json()


def test_schema_itself_is_valid_draft7():
    jsonschema.Draft7Validator.check_schema(rec.SCHEMA)


def test_required_golden_examples_exist():
    assert REQUIRED_VALID <= set(VALID_FILES)


def test_every_invalid_example_is_indexed_and_vice_versa():
    assert set(INVALID_FILES) == set(EXPECTED)
    assert len(INVALID_FILES) >= 30


@pytest.mark.parametrize("name", VALID_FILES)
def test_golden_example_is_valid_for_both_validators(name):
    data = (EXAMPLES / name).read_bytes()
    obj = rec.loads(data)
    errors = [e.message for e in VALIDATOR.iter_errors(obj)]
    assert errors == []
    # The file name says phase and method; dumps round-trips it.
    phase, _, method = name[:-len(".json")].partition("-")
    assert obj["phase"] == phase
    assert obj["method"] == (method.split("-")[0] or "periodic")
    assert rec.loads(rec.dumps(obj)) == obj


@pytest.mark.parametrize("name", INVALID_FILES)
def test_invalid_example_fails_both_validators(name):
    obj = load(INVALID / name)
    entry = EXPECTED[name]
    with pytest.raises(rec.RecordError) as info:
        rec.validate(obj)
    assert entry["error"] in str(info.value)
    # loads() (the readers' entry point) refuses it the same way.
    with pytest.raises(rec.RecordError, match=None) as info2:
        rec.loads(json.dumps(obj).encode())
    assert entry["error"] in str(info2.value)
    # The JSON Schema must agree. A few cross-field rules are not expressed in
    # the schema yet: the index says so, and this asserts exactly that, so a
    # schema fix shows up here as a failure telling us to flip the flag.
    assert (not VALIDATOR.is_valid(obj)) is entry["json_schema_rejects"], \
        f"{name}: index says json_schema_rejects={entry['json_schema_rejects']}"


def test_huge_rule_array_fails_both_validators():
    obj = example("pre-allow_access.json")
    rule = obj["access_rules"][0]
    limit = rec.MAX_ACCESS_RULES_PER_SHARE   # the same constant bounds AllowAccess
    obj["access_rules"] = [dict(rule) for _ in range(limit + 1)]
    with pytest.raises(rec.RecordError, match=rf"record.access_rules: more than {limit} items"):
        rec.validate(obj)
    assert not VALIDATOR.is_valid(obj)


def test_oversized_input_refused_before_parsing():
    with pytest.raises(rec.RecordError, match="larger than"):
        rec.loads(b" " * (rec.MAX_RECORD_BYTES + 1))


# --- semantics the golden records illustrate (the engine follows them) ------

def _rule_ids(rules):
    return {r["id"]: r["state"] for r in rules}


def test_allow_is_applying_in_pre_and_active_in_post():
    pre, post = example("pre-allow_access.json"), example("post-allow_access.json")
    for obj, state in ((pre, "applying"), (post, "active")):
        assert obj["is_allow_operation"] is True
        [concerned] = obj["access_rules"]
        assert concerned["state"] == state
        # the share's full set holds the rule with the same state
        assert _rule_ids(obj["share"]["access_rules"])[concerned["id"]] == state
    assert "result" not in pre and post["result"] == {"ok": True}


def test_deny_is_announced_in_pre_and_gone_in_post():
    pre, post = example("pre-deny_access.json"), example("post-deny_access.json")
    [rule] = pre["access_rules"]
    assert pre["is_allow_operation"] is False and rule["state"] == "denying"
    assert _rule_ids(pre["share"]["access_rules"])[rule["id"]] == "denying"
    assert post["is_allow_operation"] is False
    assert post["access_rules"][0]["id"] == rule["id"]
    assert rule["id"] not in _rule_ids(post["share"]["access_rules"])


def test_deletion_is_announced_in_pre():
    obj = example("pre-delete_share.json")
    assert obj["phase"] == "pre" and obj["share"]["status"] == "deleting"


def test_periodic_carries_every_share_with_hints():
    obj = example("periodic.json")
    assert obj["share"] is None and obj["access_rules"] == []
    by_proto = {s["protocol"]: s for s in obj["shares"]}
    assert set(by_proto) == {"NFS", "GLUSTERFS"}
    nfs = by_proto["NFS"]["mount_hints"]
    assert nfs["fstype"] == "nfs4" and nfs["export"] == "10.71.0.1:/shares/projects"
    assert isinstance(nfs["options"], list) and nfs["options"]
    assert by_proto["GLUSTERFS"]["mount_hints"] == {
        "fstype": "glusterfs", "export": "10.71.0.1:/vol1", "client_certificate_required": True}
    assert all(s["access_rules"] for s in obj["shares"])


def test_examples_tell_one_story_with_growing_seq():
    objs = [example(n) for n in VALID_FILES]
    assert {o["host"] for o in objs} == {"storage1"}
    assert len({o["epoch"] for o in objs}) == 1
    seqs = sorted(o["seq"] for o in objs)
    assert len(set(seqs)) == len(seqs)
    by_seq = sorted(objs, key=lambda o: o["seq"])
    assert [o["timestamp"] for o in by_seq] == sorted(o["timestamp"] for o in by_seq)
