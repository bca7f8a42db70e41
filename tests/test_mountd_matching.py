"""mountd.matching: which level this host gets (pure functions, real certificate)."""

import netaddr

from mountd import matching
from tests.fixtures.mountd_env import rule

A4 = matching.parse_addresses(["10.74.0.11", "127.0.0.1"])
A6 = matching.parse_addresses(["fd74::11", "fe80::1%eth0"])


def level(rules, addrs=A4, cn=None):
    return matching.access_level(rules, addrs, cn)


def test_ipv4_single_address_and_cidr():
    assert level([rule("10.74.0.11", "ro")]) == "ro"
    assert level([rule("10.74.0.0/24", "rw")]) == "rw"
    assert level([rule("10.74.0.12", "rw")]) is None
    assert level([rule("10.74.1.0/24", "rw")]) is None
    assert level([rule("10.74.0.11/32", "rw")]) == "rw"
    assert level([rule("0.0.0.0/0", "ro")]) == "ro"


def test_ipv6_single_address_and_cidr():
    assert level([rule("fd74::11", "rw")], A6) == "rw"
    assert level([rule("fd74::/64", "ro")], A6) == "ro"
    assert level([rule("fd75::/64", "ro")], A6) is None
    # Families never cross: an IPv4 rule does not match an IPv6-only host.
    assert level([rule("0.0.0.0/0", "rw")], A6) is None
    assert level([rule("::/0", "rw")], A4) is None


def test_rw_wins_over_ro_in_any_order():
    rules = [rule("10.74.0.0/24", "ro"), rule("10.74.0.11", "rw"), rule("10.74.0.11/32", "ro")]
    assert level(rules) == "rw"
    assert level(list(reversed(rules))) == "rw"


def test_only_active_rules_count():
    for state in ("queued_to_apply", "applying", "error", "queued_to_deny", "denying"):
        assert level([rule("10.74.0.11", "rw", state=state)]) is None
    assert level([rule("10.74.0.11", "rw", state="denying"), rule("10.74.0.0/24", "ro")]) == "ro"


def test_user_rules_and_garbage_never_match():
    assert level([rule("10.74.0.11", "rw", kind="user")]) is None
    assert level([rule("not-an-address", "rw")]) is None
    assert level([rule("10.74.0.11", "rw", kind="cert")], cn="10.74.0.11") == "rw"
    assert level([rule("10.74.0.11", "rw", kind="cert")], cn=None) is None


def test_parse_addresses_skips_invalid():
    addrs = matching.parse_addresses(["10.74.0.11", "bogus", "fd74::1%dummy0"])
    assert addrs == [netaddr.IPAddress("10.74.0.11"), netaddr.IPAddress("fd74::1")]


def test_cert_cn_from_a_real_certificate(mountd_cert):
    cert, _key, cn = mountd_cert
    assert matching.certificate_cn(cert) == cn
    assert level([rule(cn, "ro", kind="cert")], [], matching.certificate_cn(cert)) == "ro"
    assert level([rule("other.example.org", "rw", kind="cert")], [], cn) is None


def test_cert_cn_unreadable(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    assert matching.certificate_cn(str(bad)) is None


def test_subject_cn_escapes():
    assert matching.subject_cn("CN=a\\,b,O=x") == "a,b"
    assert matching.subject_cn("O=x,CN=host1") == "host1"
    assert matching.subject_cn("O=no cn") is None
