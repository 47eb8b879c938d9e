"""Fetch a file named by a request's ``urls``: http(s) only, size-capped, time-limited, and
refusing private, loopback and link-local addresses (so a job cannot reach the worker's own
network) unless ``FASTBACKEND_ALLOW_PRIVATE_URLS=1``.

Redirects are followed by hand so every hop is checked the same way.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urljoin, urlsplit

import requests

MAX_URL_BYTES = int(os.environ.get("FASTBACKEND_MAX_URL_BYTES", 500_000_000))
URL_TIMEOUT_S = float(os.environ.get("FASTBACKEND_URL_TIMEOUT_S", "60"))
MAX_REDIRECTS = 5
CHUNK_BYTES = 1 << 20


class FetchProblem(ValueError):
    """Why a URL could not be used; shown to the user after the URL."""


def private_urls_allowed() -> bool:
    return os.environ.get("FASTBACKEND_ALLOW_PRIVATE_URLS", "") in ("1", "true", "yes")


def check_url(url: str) -> None:
    """Refuse schemes other than http(s) and hosts that resolve to non-public addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchProblem(f"scheme {parts.scheme or '(none)'!r} is not allowed; use http or https")
    if not parts.hostname:
        raise FetchProblem("has no host")
    if private_urls_allowed():
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise FetchProblem(f"host {parts.hostname!r} does not resolve ({exc.strerror})") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise FetchProblem(
                f"host {parts.hostname!r} is a private or local address ({address}); "
                "set FASTBACKEND_ALLOW_PRIVATE_URLS=1 on the worker to allow it"
            )


def fetch(url: str, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """The body at ``url``, or FetchProblem naming what went wrong."""
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url)
        try:
            with requests.get(url, stream=True, timeout=URL_TIMEOUT_S, allow_redirects=False) as response:
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
