"""Fetch a file named by a request's ``urls``: http(s) only, size-capped, time-limited, and
refusing private, loopback and link-local addresses (so a job cannot reach the worker's own
network) unless ``FASTBACKEND_ALLOW_PRIVATE_URLS=1``.

Redirects are followed by hand so every hop is checked the same way.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import requests

from fastbackend import settings

MAX_REDIRECTS = 5
CHUNK_BYTES = 1 << 20


class FetchProblem(ValueError):
    """Why a URL could not be used; shown to the user after the URL."""


def check_url(url: str) -> None:
    """Refuse schemes other than http(s) and hosts that resolve to non-public addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchProblem(f"scheme {parts.scheme or '(none)'!r} is not allowed; use http or https")
    if not parts.hostname:
        raise FetchProblem("has no host")
    if settings.ALLOW_PRIVATE_URLS.get():
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise FetchProblem(f"host {parts.hostname!r} does not resolve ({exc.strerror})") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            raise FetchProblem(
                f"host {parts.hostname!r} is a private or local address ({address}); "
                "set FASTBACKEND_ALLOW_PRIVATE_URLS=1 on the worker to allow it"
            )


def fetch(url: str, max_bytes: int | None = None) -> bytes:
    """The body at ``url`` (at most ``max_bytes``, default the setting), or FetchProblem naming what went wrong."""
    max_bytes = settings.MAX_URL_BYTES.get() if max_bytes is None else max_bytes
    timeout = settings.URL_TIMEOUT_S.get()
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url)
        try:
            with requests.get(url, stream=True, timeout=timeout, allow_redirects=False) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchProblem(f"answered HTTP {response.status_code}")
                return _read_capped(response, max_bytes)
        except requests.RequestException as exc:
            raise FetchProblem(f"could not be fetched ({type(exc).__name__})") from None
    raise FetchProblem(f"redirected more than {MAX_REDIRECTS} times")


def _read_capped(response: requests.Response, max_bytes: int) -> bytes:
    declared = int(response.headers.get("content-length") or 0)
    if declared > max_bytes:
        raise FetchProblem(f"is {declared:,} bytes, over the {max_bytes:,}-byte limit")
    body = bytearray()
    for chunk in response.iter_content(CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            raise FetchProblem(f"is over the {max_bytes:,}-byte limit")
    return bytes(body)
