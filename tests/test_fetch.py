"""URL fetches: bounded in time and size, checked addresses only, nothing secret echoed."""

from __future__ import annotations

import http.server
import io
import ipaddress
import socket
import threading
import time

import pytest

from fastbackend import fetch
from fastbackend.datasets import shown_url
from tests.photos import nine_photos
from tests.test_upload import upload


class DripHandler(http.server.BaseHTTPRequestHandler):
    """/drip sends 100 bytes, one every 0.2 s; /headers drips its headers; /photo a photo at once."""

    def do_GET(self):
        if self.path == "/headers":
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 100:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
            return
        if self.path == "/bad-length":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nx")
            return
        if self.path == "/share/abc123":  # a share link without a file name, redirecting to the file
            self.send_response(302)
            self.send_header("Location", "/files/IMG_0000.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        photo_paths = ("/photo", "/files/IMG_0000.jpg")
        body = nine_photos()[0][1] if self.path in photo_paths else b"x" * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in photo_paths:
            self.wfile.write(body)
            return
        for byte in body:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.2)

    def log_message(self, *args):
        pass


@pytest.fixture
def drip_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DripHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_server_sending_a_byte_at_a_time_is_cut_off_at_the_url_deadline(drip_server, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("FASTBACKEND_URL_TIMEOUT_S", "1")  # every single read is quick enough
    monkeypatch.setenv("FASTBACKEND_URL_DEADLINE_S", "1")
    started = time.monotonic()
    with pytest.raises(fetch.FetchProblem, match=r"^took longer than the 1-second limit"):
        fetch.fetch(f"http://127.0.0.1:{drip_server}/drip", io.BytesIO())
    assert time.monotonic() - started < 3


def test_all_urls_of_a_request_share_one_deadline(drip_server, data_root, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("FASTBACKEND_URLS_DEADLINE_S", "1.5")
    base = f"http://127.0.0.1:{drip_server}"
    started = time.monotonic()
    answer = upload(urls=[f"{base}/drip", f"{base}/drip", f"{base}/drip"])
    assert time.monotonic() - started < 5  # not three times 20 s
    assert answer["error_code"] == "invalid_upload" and len(answer["details"]) == 3
    assert all("took longer than" in line for line in answer["details"])


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:0:127.0.0.1",
        "64:ff9b::7f00:1",
        "64:ff9b:1::7f00:1",
        "2002:7f00:1::1",
        "::169.254.169.254",
    ],
)
def test_private_addresses_are_refused_in_every_spelling(address):
    with pytest.raises(fetch.FetchProblem, match="is a private or local address"):
        fetch.check_public("h", ipaddress.ip_address(address))


def test_public_addresses_pass():
    for address in ("93.184.215.14", "2606:4700:4700::1111", "64:ff9b::5db8:d70e"):  # the last: NAT64 of a public one
        fetch.check_public("h", ipaddress.ip_address(address))


def test_the_connection_goes_to_the_address_that_was_checked(drip_server, monkeypatch):
    """DNS rebinding: the name resolves to the checked address once, then elsewhere; the fetch
    must use the first answer and never ask again."""
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    answers = iter(["127.0.0.1", "10.255.255.1"])
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host == "photos.example":
            return real(next(answers), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    body = io.BytesIO()
    fetch.fetch(f"http://photos.example:{drip_server}/photo", body)
    assert body.getvalue() == nine_photos()[0][1]
    assert next(answers) == "10.255.255.1"  # the second answer was never asked for


def test_malformed_urls_are_problems_not_crashes():
    for url, reason in (
        ("http://127.0.0.1:99999/x", "is not a valid URL"),
        ("http://[::1/x", "is not a valid URL"),
        ("http:///x", "has no host"),
    ):
        with pytest.raises(fetch.FetchProblem, match=reason):
            fetch.fetch(url, io.BytesIO())


def test_credentials_in_urls_are_never_shown():
    assert shown_url("https://user:pass@host.example:8443/a.jpg?sig=1") == "https://host.example:8443/a.jpg"


def test_a_malformed_url_in_an_upload_is_named_not_an_internal_error(data_root):
    answer = upload(urls=["http://[::1/x.jpg"])
    assert answer["error_code"] == "invalid_upload"
    assert answer["error"] == "input.urls[0] ('http://[::1/x.jpg'): is not a valid URL (Invalid IPv6 URL)"


def test_a_file_behind_a_redirect_takes_the_final_urls_name(drip_server, data_root, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    answer = upload(urls=[f"http://127.0.0.1:{drip_server}/share/abc123"])
    assert answer["status"] == "success", answer
    assert [f["filename"] for f in answer["uploaded_files"]] == ["IMG_0000.jpg"]


def test_a_file_named_for_another_format_is_refused(data_root):
    from tests.photos import b64, photo

    answer = upload(files=[{"filename": "a.png", "content": b64(photo(300, 300))}])  # JPEG bytes
    assert answer["error"] == "input.files[0] ('a.png'): 'a.png' holds JPEG data; name it .jpg or .jpeg"


def test_a_server_dripping_its_headers_is_cut_off_too(drip_server, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("FASTBACKEND_URL_TIMEOUT_S", "1")
    monkeypatch.setenv("FASTBACKEND_URL_DEADLINE_S", "1")
    started = time.monotonic()
    with pytest.raises(fetch.FetchProblem, match=r"^took longer than the 1-second limit"):
        fetch.fetch(f"http://127.0.0.1:{drip_server}/headers", io.BytesIO())
    assert time.monotonic() - started < 3


def test_a_content_length_that_is_not_a_number_is_a_problem(drip_server, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    with pytest.raises(fetch.FetchProblem, match="Content-Length that is not a number"):
        fetch.fetch(f"http://127.0.0.1:{drip_server}/bad-length", io.BytesIO())


class Redirect:
    """What a public server answers: go to loopback."""

    status = 302

    def __init__(self, location: str):
        self.headers = {"location": location}

    def release_conn(self) -> None:
        pass


def test_a_redirect_to_a_private_address_is_refused(drip_server, monkeypatch):
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):
        if host == "public.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    redirect = Redirect(f"http://127.0.0.1:{drip_server}/photo")
    monkeypatch.setattr(fetch, "open_url", lambda target, deadline, watchdog: redirect)
    with pytest.raises(fetch.FetchProblem, match="is a private or local address"):
        fetch.fetch("http://public.example/share", io.BytesIO())
