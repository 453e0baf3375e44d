"""URL policy: decides whether the pipeline may fetch a URL, before any request is sent.

Input: one URL string and a `UrlPolicyConfig`. Output: None (allowed) or one refusal reason from
`REFUSAL_REASONS`. Refuses other schemes, loopback/private/link-local/reserved addresses and cloud
metadata endpoints, checking every address a hostname resolves to. This module never sends a
request; it may resolve names (DNS) when `resolve_hostnames` is true.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

REFUSAL_REASONS: tuple[str, ...] = (
    "malformed_url",
    "scheme_not_allowed",
    "loopback_address",
    "private_address",
    "link_local_address",
    "metadata_address",
    "reserved_address",
    "unresolvable_host",
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_ADDRESSES: frozenset[IpAddress] = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS IPv6
    )
)
METADATA_HOSTNAMES: frozenset[str] = frozenset(
    (
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.internal",
    )
)

# RFC 1918, RFC 6598 carrier-grade NAT, RFC 4193 unique local: explicit so that
# documentation and benchmark ranges are reported as "reserved", not "private".
_PRIVATE_NETWORKS: tuple[IpNetwork, ...] = tuple(
    ipaddress.ip_network(network)
    for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
_THIS_HOST_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64_NETWORK = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE_NETWORK = ipaddress.ip_network("::/96")


@dataclass(frozen=True, kw_only=True, slots=True)
class UrlPolicyConfig:
    """Which URLs the downloader may fetch."""

    allowed_schemes: tuple[str, ...] = ("http", "https")
    """Lower-case URL schemes that may be fetched; anything else is "scheme_not_allowed"."""
    allow_hosts: tuple[str, ...] = ()
    """Hostnames, IPs or CIDRs allowed even if loopback/private (never unlocks metadata)."""
    resolve_hostnames: bool = True
    """Resolve names and check every address; False checks IP literals and known names only."""

    def __post_init__(self) -> None:
        if not self.allowed_schemes:
            raise ValueError("allowed_schemes: must name at least one scheme")
        for scheme in self.allowed_schemes:
            if not scheme or scheme != scheme.lower() or not scheme.isascii():
                raise ValueError(f"allowed_schemes: {scheme!r} must be a lower-case ASCII scheme")
        for entry in self.allow_hosts:
            if not _is_valid_allow_entry(entry):
                raise ValueError(f"allow_hosts: {entry!r} is not a hostname, IP or CIDR")


def check_url(url: str, config: UrlPolicyConfig) -> str | None:
    """Return None when `url` may be fetched, else a reason from REFUSAL_REASONS."""
    host, reason = _parse_host(url, config)
    if reason is not None:
        return reason
    literal = _parse_ip_literal(host)
    if literal is not None:
        return _check_address(literal, config)
    if host in METADATA_HOSTNAMES:
        return "metadata_address"
    if host in _allowed_names(config):
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback_address"
    if not config.resolve_hostnames:
        return None
    return _check_resolved(host, config)


def _parse_host(url: str, config: UrlPolicyConfig) -> tuple[str, str | None]:
    """The normalised hostname of `url`, or ("", reason) when the URL is unusable."""
    if not isinstance(url, str) or not url.isprintable() or " " in url or "\\" in url:
        return "", "malformed_url"
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        return "", "malformed_url"
    if not parts.scheme:
        return "", "malformed_url"
    if parts.scheme.lower() not in config.allowed_schemes:
        return "", "scheme_not_allowed"
    if not parts.netloc:
        return "", "malformed_url"
    # Parsers disagree on where the host starts when userinfo or escapes are present
    # (urllib unquotes the host, urlsplit does not), so such URLs are refused outright.
    if "@" in parts.netloc or "%" in parts.netloc:
        return "", "malformed_url"
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return "", "malformed_url"
    return host, None


def _parse_ip_literal(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not all(char in "0123456789abcdefx." for char in host):
        return None
    # Legacy numeric forms ("127.1", "2130706433", "0x7f.1") reach the same address in urllib.
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _check_resolved(host: str, config: UrlPolicyConfig) -> str | None:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return "unresolvable_host"
    addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    if not addresses:
        return "unresolvable_host"
    for address in sorted(addresses, key=str):
        reason = _check_address(address, config)
        if reason is not None:
            return reason
    return None


def _check_address(address: IpAddress, config: UrlPolicyConfig) -> str | None:
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return _check_address(embedded, config)
    if address in METADATA_ADDRESSES:
        return "metadata_address"
    if any(address in network for network in _allowed_networks(config)):
        return None
    return _classify_address(address)


def _classify_address(address: IpAddress) -> str | None:
    # Connecting to 0.0.0.0 (or ::) reaches the local host on Linux.
    if address.is_loopback or address.is_unspecified or address in _THIS_HOST_NETWORK:
        return "loopback_address"
    if address.is_link_local:
        return "link_local_address"
    if any(address in network for network in _PRIVATE_NETWORKS):
        return "private_address"
    if address.is_multicast or address.is_reserved or not address.is_global:
        return "reserved_address"
    return None


def _embedded_ipv4(address: IpAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, NAT64, 6to4, compatible)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_NETWORK:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _IPV4_COMPATIBLE_NETWORK and int(address) > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _allowed_networks(config: UrlPolicyConfig) -> list[IpNetwork]:
    networks = []
    for entry in config.allow_hosts:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    return networks


def _allowed_names(config: UrlPolicyConfig) -> set[str]:
    return {entry.lower().rstrip(".") for entry in config.allow_hosts}


def _is_valid_allow_entry(entry: str) -> bool:
    if not isinstance(entry, str) or not entry:
        return False
    try:
        ipaddress.ip_network(entry, strict=False)
        return True
    except ValueError:
        pass
    return entry.isascii() and all(char.isalnum() or char in "-._" for char in entry)
