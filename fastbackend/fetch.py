"""Fetch a file named by a request's ``urls``: http(s) only, size-capped, time-limited, and
refusing private, loopback and link-local addresses (so a job cannot reach the worker's own
network) unless ``FASTBACKEND_ALLOW_PRIVATE_URLS=1``.

- Every hop of a redirect is checked the same way, at most ``MAX_REDIRECTS`` of them.
- The name is resolved once, every address it resolves to is checked (with the IPv4 address
  that IPv6 forms such as ``::ffff:a.b.c.d``, NAT64 and 6to4 carry), and the connection goes to
  the address that was checked: a DNS answer that changes in between (rebinding) changes nothing.
  TLS still verifies the certificate against the name.
- Time is bounded per read (``URL_TIMEOUT_S``), per URL (``URL_DEADLINE_S``, a server sending one
  byte at a time cannot hold the worker) and per request (the caller's ``deadline``).
- Sizes are bounded by ``MAX_URL_BYTES``; header lines and counts by http.client's own limits.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import urllib3

from fastbackend import settings

MAX_REDIRECTS = 5
CHUNK_BYTES = 1 << 20
REDIRECTS = (301, 302, 303, 307, 308)
# IPv6 prefixes whose last 32 bits are an IPv4 address: NAT64 (well-known and local-use) and
# IPv4-translated; mapped (::ffff:) and 6to4 have their own properties.
IPV4_CARRIERS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96"))


class Sink(Protocol):
    """Where a body goes as it arrives: an open file, or anything else with ``write``."""

    def write(self, chunk: bytes, /) -> object: ...


class FetchProblem(ValueError):
    """Why a URL could not be used; shown to the user after the URL."""


@dataclass(frozen=True)
class Target:
    """Where one URL's request goes: the checked address, and the name TLS and Host must carry."""

    scheme: str
    host: str
    port: int
    address: str
    path: str  # path and query, as sent


def fetch(url: str, out: Sink, max_bytes: int | None = None, deadline: float | None = None) -> tuple[int, str]:
    """Write the body at ``url`` to ``out`` as it arrives (memory holds one chunk); return its size
    and the URL it came from after redirects, or raise FetchProblem naming what went wrong.

    ``deadline`` (a ``time.monotonic()`` value) bounds the whole fetch together with the per-URL
    limit; ``max_bytes`` defaults to the setting.
    """
    max_bytes = settings.MAX_URL_BYTES.get() if max_bytes is None else max_bytes
    limit_s = settings.URL_DEADLINE_S.get()
    own_deadline = time.monotonic() + limit_s
    deadline = own_deadline if deadline is None else min(deadline, own_deadline)
    for _ in range(MAX_REDIRECTS + 1):
        target = resolve(url)
        with Watchdog(deadline) as watchdog:
            try:
                response = open_url(target, deadline, watchdog)
                try:
                    if response.status in REDIRECTS and response.headers.get("location"):
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status != 200:
                        raise FetchProblem(f"answered HTTP {response.status}")
                    return read_capped(response, out, max_bytes, deadline, limit_s), url
                finally:
                    response.release_conn()
            except FetchProblem:
                if watchdog.fired:
                    raise FetchProblem(f"took longer than the {limit_s:g}-second limit (or the request's)") from None
                raise
    raise FetchProblem(f"redirected more than {MAX_REDIRECTS} times")


class Watchdog:
    """Shuts the connection down at the deadline, whatever it is doing: a server that drips its
    headers or its TLS handshake a byte at a time gets no more time than one that drips its body."""

    def __init__(self, deadline: float):
        self.sock: socket.socket | None = None
        self.fired = False
        self.timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def watch(self, connection_class: type) -> type:
        """``connection_class`` whose new sockets this watchdog can shut."""
        watchdog = self

        class Watched(connection_class):  # type: ignore[misc, valid-type]
            def _new_conn(self):
                watchdog.sock = super()._new_conn()
                return watchdog.sock

        return Watched

    def __enter__(self) -> Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()


def resolve(url: str) -> Target:
    """The URL's target, its name resolved once and every address checked."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced IPv6 bracket
        raise FetchProblem(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise FetchProblem(f"scheme {parts.scheme or '(none)'!r} is not allowed; use http or https")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a port out of range, a bad IPv6 literal
        raise FetchProblem(f"is not a valid URL ({exc})") from None
    if not host:
        raise FetchProblem("has no host")
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchProblem(f"host {host!r} does not resolve ({getattr(exc, 'strerror', None) or exc})") from None
    addresses = [str(info[4][0]).split("%")[0] for info in infos]
    if not settings.ALLOW_PRIVATE_URLS.get():
        for address in addresses:
            check_public(host, ipaddress.ip_address(address))
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port, addresses[0], path)


def check_public(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    embedded = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    if not address.is_global or (embedded is not None and not embedded.is_global):
        raise FetchProblem(
            f"host {host!r} is a private or local address ({address}); "
            "set FASTBACKEND_ALLOW_PRIVATE_URLS=1 on the worker to allow it"
        )


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64, IPv4-compatible), if any:
    Python counts some of these forms as global whatever the IPv4 address inside them is."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in carrier for carrier in IPV4_CARRIERS) or int(address) >> 32 == 0:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def open_url(target: Target, deadline: float, watchdog: Watchdog) -> urllib3.HTTPResponse:
    """GET ``target`` on a connection to its checked address; the response is not read yet."""
    per_read = min(settings.URL_TIMEOUT_S.get(), max(0.1, deadline - time.monotonic()))
    options: dict = {"timeout": urllib3.Timeout(connect=per_read, read=per_read), "retries": False, "maxsize": 1}
    if target.scheme == "https":
        options |= {"server_hostname": target.host, "assert_hostname": target.host}
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(target.address, target.port, **options)
    else:
        pool = urllib3.HTTPConnectionPool(target.address, target.port, **options)
    pool.ConnectionCls = watchdog.watch(pool.ConnectionCls)
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    if ":" in target.host:  # an IPv6 literal
        host_header = f"[{target.host}]" if target.port == default_port else f"[{target.host}]:{target.port}"
    try:
        return pool.urlopen(
            "GET",
            target.path,
            headers={"Host": host_header},
            redirect=False,
            preload_content=False,
            assert_same_host=False,
        )
    except urllib3.exceptions.HTTPError as exc:
        raise FetchProblem(f"could not be fetched ({_reason(exc)})") from None


def read_capped(response: urllib3.HTTPResponse, out: Sink, max_bytes: int, deadline: float, limit_s: float) -> int:
    try:
        declared = int(response.headers.get("content-length") or 0)
    except ValueError:
        raise FetchProblem("answered a Content-Length that is not a number") from None
    if declared > max_bytes:
        raise FetchProblem(f"is {declared:,} bytes, over the {max_bytes:,}-byte limit")
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise FetchProblem(f"took longer than the {limit_s:g}-second limit (or the request's) to arrive")
        try:
            chunk = response.read1(CHUNK_BYTES)  # whatever has arrived: a slow sender cannot stretch one read
        except urllib3.exceptions.HTTPError as exc:
            raise FetchProblem(f"could not be fetched ({_reason(exc)})") from None
        if not chunk:
            return size
        size += len(chunk)
        if size > max_bytes:
            raise FetchProblem(f"is over the {max_bytes:,}-byte limit")
        out.write(chunk)


def _reason(exc: Exception) -> str:
    """The kind of failure, without the URL (which may hold a signed token)."""
    inner = getattr(exc, "reason", None)
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError) or isinstance(inner, urllib3.exceptions.ReadTimeoutError):
        return "ReadTimeout"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError) or isinstance(
        inner, urllib3.exceptions.ConnectTimeoutError
    ):
        return "ConnectTimeout"
    return type(inner).__name__ if isinstance(inner, Exception) else type(exc).__name__
