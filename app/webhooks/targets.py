"""Where a webhook may point: an http(s) URL whose host resolves only to public addresses.

Checked twice: when the job is created (the API answers 422) and before every delivery attempt,
on a fresh resolution, so a name that later resolves to an internal address (DNS rebinding) is
refused then. Every resolved address must be public (`ipaddress.is_global`: not private,
loopback, link-local, shared/CGNAT, reserved, multicast or unspecified; IPv4-mapped IPv6 is
judged by its IPv4 address), and the delivery connects to one of the addresses just checked
(`Target.address`), never to a second resolution. `allow_private` (the setting
SPARSESHOT_WEBHOOK_ALLOW_PRIVATE) skips the address check, for receivers on the same network.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_CHARS = 2048
SCHEMES = ("http", "https")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(ValueError):
    """The URL is not a webhook target this service sends to; the message says why."""


@dataclass(frozen=True)
class Target:
    """A checked URL: its parts, and the address a delivery connects to."""

    url: str
    scheme: str
    host: str  # as written (a name, or an IP literal without brackets)
    port: int
    address: str  # one of the resolved addresses, all of which were checked


def parse(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an absolute http(s) URL; TargetRefused otherwise."""
    if len(url) > MAX_URL_CHARS:
        raise TargetRefused(f"webhook_url is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise TargetRefused(f"webhook_url is not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise TargetRefused(f"webhook_url must be http:// or https://, not {parts.scheme or 'no'} scheme")
    if not parts.hostname:
        raise TargetRefused("webhook_url has no host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("webhook_url must not carry credentials (sign-in is by the signature header)")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80)


def _is_public(addr: Address) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_global) and not addr.is_multicast


def resolve(host: str, port: int) -> list[Address]:
    """Every address `host` resolves to (an IP literal: itself); TargetRefused when none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise TargetRefused(f"webhook host {host!r} does not resolve: {e}") from None
    found: list[Address] = []
    for *_, sockaddr in infos:
        addr = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone id
        if addr not in found:
            found.append(addr)
    if not found:
        raise TargetRefused(f"webhook host {host!r} resolves to no address")
    return found


def check(url: str, *, allow_private: bool) -> Target:
    """The checked target of `url`: resolved now, every address public unless `allow_private`."""
    scheme, host, port = parse(url)
    addresses = resolve(host, port)
    if not allow_private:
        refused = [str(a) for a in addresses if not _is_public(a)]
        if refused:
            raise TargetRefused(
                f"webhook host {host!r} resolves to non-public address(es) {', '.join(refused)} "
                "(private, loopback or link-local); set SPARSESHOT_WEBHOOK_ALLOW_PRIVATE=true to allow them")
    return Target(url=url, scheme=scheme, host=host, port=port, address=str(addresses[0]))
