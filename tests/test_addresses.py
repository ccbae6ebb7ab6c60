"""
The rank of addresses, and the rule that an upstream leads only where it is
no more private than itself, unless the operator allows a network.
"""

import pytest

from regcache.addresses import LINK_LOCAL, LOOPBACK, NEVER, PRIVATE, PUBLIC, privacy, refusal
from regcache.config import ConfigError, parse_networks


@pytest.mark.parametrize("address, rank", [
    ("104.16.0.1", PUBLIC), ("2606:4700::1", PUBLIC),
    ("10.1.2.3", PRIVATE), ("172.16.0.1", PRIVATE), ("192.168.1.1", PRIVATE), ("100.64.0.1", PRIVATE),
    ("fd00::1", PRIVATE), ("198.18.0.1", PRIVATE),
    ("127.0.0.1", LOOPBACK), ("127.8.9.10", LOOPBACK), ("::1", LOOPBACK), ("::ffff:127.0.0.1", LOOPBACK),
    ("169.254.169.254", LINK_LOCAL), ("fe80::1%eth0", LINK_LOCAL), ("::ffff:169.254.169.254", LINK_LOCAL),
    ("0.0.0.0", NEVER), ("::", NEVER), ("224.0.0.1", NEVER), ("240.0.0.1", NEVER), ("not-an-ip", NEVER),
])
def test_each_address_has_its_rank(address, rank):
    """Public, private, loopback, link-local and never are told apart, IPv4-mapped IPv6 included."""
    assert privacy(address) == rank


def test_a_public_upstream_leads_only_to_public_addresses():
    """From the internet, no redirect reaches loopback, link-local, private or unusable addresses."""
    assert refusal("104.16.0.1", PUBLIC) is None
    for target in ("127.0.0.1", "169.254.169.254", "10.0.0.1", "fd00::1", "0.0.0.0"):
        assert refusal(target, PUBLIC), target


def test_a_private_upstream_may_not_lead_to_loopback_or_link_local():
    """An upstream on the private network may redirect within it, never to loopback or metadata."""
    assert refusal("10.0.0.2", PRIVATE) is None
    assert refusal("104.16.0.1", PRIVATE) is None
    assert "loopback" in refusal("127.0.0.1", PRIVATE)
    assert "link-local" in refusal("169.254.169.254", PRIVATE)


def test_a_loopback_upstream_may_lead_to_loopback_but_not_to_metadata():
    """As in tests: loopback to loopback is fine; link-local and 0.0.0.0 never are."""
    assert refusal("127.0.0.1", LOOPBACK) is None
    assert refusal("169.254.169.254", LOOPBACK)
    assert refusal("0.0.0.0", LOOPBACK)


def test_the_operator_can_allow_a_network():
    """An allowed network opens exactly its addresses (IPv4-mapped ones too), nothing else."""
    allowed = parse_networks("--upstream-allow", ["10.20.0.0/16"])
    assert refusal("10.20.3.4", PUBLIC, allowed) is None
    assert refusal("10.21.3.4", PUBLIC, allowed)
    assert refusal("::ffff:10.20.3.4", PUBLIC, allowed) is None
    assert refusal("fd00::1", PUBLIC, allowed)
    with pytest.raises(ConfigError):
        parse_networks("--upstream-allow", ["10.0.0.0/33"])
