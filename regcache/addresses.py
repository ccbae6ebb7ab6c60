# test-case-name: tests.test_addresses
"""
How private an address is, so that nothing an upstream says (a redirect, a
token realm) can make regcache connect somewhere more private than that
upstream itself: the cloud metadata address, a database on the node, the
pod's own loopback.  Bytes are checked against their digest, so such a
request could never return content; it is still a request a mirror holding
credentials must never make for a stranger (server-side request forgery).

Addresses rank from public to never: an upstream may lead only to addresses
that rank no higher than its own.  An operator can allow more networks.
"""

import ipaddress
from typing import Optional

PUBLIC, PRIVATE, LOOPBACK, LINK_LOCAL, NEVER = range(5)

NAMES = {PUBLIC: "public", PRIVATE: "private", LOOPBACK: "loopback", LINK_LOCAL: "link-local", NEVER: "unusable"}

#: Carrier-grade NAT space (RFC 6598): not global, and not in Python's
#: is_private either.
_SHARED = ipaddress.ip_network("100.64.0.0/10")


def _parse(text: str):
    """The address ``text`` names, IPv4-mapped IPv6 as the IPv4 it is; None for no address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def privacy(text: str) -> int:
    """
    The rank of one address: public, private (RFC 1918, unique-local,
    CGNAT and everything else not globally routable), loopback, link-local
    (169.254.0.0/16 and fe80::/10: metadata services), or never
    (unspecified, multicast, reserved: 0.0.0.0 reaches the host itself).
    """
    address = _parse(text)
    if address is None or address.is_unspecified:
        return NEVER
    if address.is_loopback:
        return LOOPBACK
    if address.is_multicast or address.is_reserved:
        return NEVER
    if address.is_link_local:
        return LINK_LOCAL
    if address.is_global and address not in _SHARED:
        return PUBLIC
    return PRIVATE


def refusal(target: str, home: int, allowed=()) -> Optional[str]:
    """
    Why regcache may not connect to ``target`` for an upstream whose own
    address ranks ``home``, or None if it may.
    """
    rank = privacy(target)
    address = _parse(target)
    if address is None:
        return f"{target} is not an address"
    if any(address.version == n.version and address in n for n in allowed):
        return None
    if rank == NEVER or rank > home:
        return (f"{target} is a {NAMES[rank]} address, more private than the upstream's own "
                f"({NAMES[home]})" if rank != NEVER else f"{target} is an {NAMES[rank]} address")
    return None
