"""Issue 16, findings 3 and 4: a crafted body answers 4xx in the route's error shape, writes
nothing, and leaves the pooled edge-to-service connections working for the next client."""

from __future__ import annotations

import asyncio
import uuid
import zlib

import pytest

from deploy.launcher import Stack
from tests.auth.test_auth import PASSWORD, sign_up
from tests.security.helpers import call, db, fresh_address, plex_error_codes

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

FORM_ROUTES = [  # (method, path, error family) of every public route that reads a body
    ("POST", "/api/v2/users", "plex"), ("POST", "/api/v2/users/signin", "plex"),
    ("POST", "/api/v2/users/password/reset", "plex"), ("PUT", "/api/v2/users/password", "plex"),
    ("PUT", "/api/v2/user/password", "plex"), ("POST", "/api/v2/pins", "plex"), ("PUT", "/api/v2/pins/link", "plex"),
    ("POST", "/api/claim/exchange", "plex"), ("POST", "/oauth/device/code", "oauth"), ("POST", "/oauth/token", "oauth"),
    ("POST", "/signup", "web"), ("POST", "/signin", "web"), ("POST", "/forgot", "web"), ("POST", "/reset", "web"),
    ("POST", "/signout", "web"),
]


def assert_shape(family: str, status: int, body: object, headers: object) -> None:
    assert 400 <= status < 500, (status, body)
    if family == "plex":
        plex_error_codes(body)
    elif family == "oauth":
        assert isinstance(body, dict) and "error" in body, body
    else:
        assert "text/html" in headers["Content-Type"] and "<html" in str(body).lower()  # type: ignore[index]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_is_not_what_content_encoding_says_breaks_nobody(stack: Stack, encoding: str) -> None:
    """The probe's reproduction: ten rounds of a broken gzip (deflate) POST followed by another
    client's normal POST through the same edge; no 500, no 502."""
    a = await sign_up(stack)
    for _ in range(10):
        status, body, _ = await call(stack, "POST", "/api/v2/users/signin", source=fresh_address(),
                                     data=b"login=x&password=this is not gzip at all",
                                     headers={"Content-Encoding": encoding,
                                              "Content-Type": "application/x-www-form-urlencoded"})
        assert status == 415 and plex_error_codes(body) == [1415], (status, body)
        status, body, _ = await call(stack, "POST", "/api/v2/users/signin",
                                     data={"login": a["username"], "password": PASSWORD})
        assert status == 201, (status, body)
    # A real compressed body is refused the same way (Hearth takes bodies as sent), and harmlessly.
    status, _, _ = await call(stack, "POST", "/api/v2/users/signin", source=fresh_address(),
                              data=zlib.compress(b"login=x&password=y"),
                              headers={"Content-Encoding": encoding,
                                       "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415


async def test_bogus_charsets_and_multipart_parts_answer_4xx_on_every_form_route(stack: Stack) -> None:
    bad_bodies = [
        ({"Content-Type": "application/x-www-form-urlencoded; charset=bogus"}, b"email=a%40b.c&login=x"),
        ({"Content-Type": "application/x-www-form-urlencoded; charset=rot13"}, b"email=a%40b.c"),
        ({"Content-Type": "multipart/form-data; boundary=XX"},
         b"--XX\r\nContent-Disposition: form-data; name=\"email\"\r\nContent-Transfer-Encoding: bogus\r\n\r\n"
         b"a@b.c\r\n--XX--\r\n"),
        ({"Content-Type": "multipart/form-data; boundary=XX"},
         b"--XX\r\nContent-Disposition: form-data; name=\"email\"\r\nContent-Type: text/plain; charset=bogus\r\n\r\n"
         b"a@b.c\r\n--XX--\r\n"),
        ({"Content-Type": "multipart/form-data; boundary=XX"}, b"--XX\r\nthis is no part\r\n"),
        ({"Content-Type": "multipart/form-data"}, b"no boundary"),
    ]
    source = fresh_address()
    for method, path, family in FORM_ROUTES:
        for headers, data in bad_bodies:
            status, body, h = await call(stack, method, path, source=source, data=data, headers=dict(headers),
                                         json_accept=family != "web")
            assert_shape(family, status, body, h)


async def test_nul_and_control_characters_answer_400_before_anything_is_written(stack: Stack) -> None:
    source = fresh_address()
    name = f"n{uuid.uuid4().hex[:10]}"
    cases = [
        ("POST", "/api/v2/users", {"email": f"{name}\x00@example.org", "username": name, "password": PASSWORD}, {}),
        ("POST", "/api/v2/users", {"email": f"{name}@example.org", "username": name, "password": PASSWORD},
         {"X-Plex-Device-Name": "tv\x00"}),
        ("POST", "/api/v2/users?X-Plex-Product=a%00b", {"email": f"{name}@example.org", "username": name,
                                                         "password": PASSWORD}, {}),
        ("POST", "/api/v2/users/signin", {"login": "a\x00b", "password": "x"}, {}),
        ("POST", "/api/v2/users/signin", {"login": "ab", "password": "x"}, {"X-Plex-Product": "p\x01"}),
        ("POST", "/api/v2/users/password/reset", {"email": "a\x00@b.c"}, {}),
        ("POST", "/oauth/device/code", {"client_id": "tv\x00", "scope": "a"}, {}),
        ("POST", "/oauth/device/code", {"client_id": "tv", "scope": "a\x00"}, {}),
        ("POST", "/api/v2/pins", {}, {"X-Plex-Client-Identifier": "c\x00"}),
        ("POST", "/api/v2/pins", {"X-Plex-Device-Name": "d\x00"}, {}),
        ("POST", "/api/claim/exchange?token=claim-x%00", {}, {}),
    ]
    auth, linkcode = await db(stack, "auth"), await db(stack, "linkcode")
    try:
        accounts = await auth.fetchval("SELECT count(*) FROM accounts")
        pins = await linkcode.fetchval("SELECT count(*) FROM pins")
        codes = await linkcode.fetchval("SELECT count(*) FROM device_codes")
        for method, path, data, headers in cases:
            for encode in ("form", "json", "multipart"):
                kw: dict[str, object] = {"data": data} if encode == "form" else {"json": data}
                if encode == "multipart":
                    import aiohttp

                    mp = aiohttp.FormData()
                    for k, v in data.items():
                        mp.add_field(k, v)
                    kw = {"data": mp} if data else {"data": data}
                try:
                    status, body, _ = await call(stack, method, path, source=source, headers=dict(headers), **kw)
                except ValueError:
                    continue  # aiohttp refuses to send a header holding NUL: nothing to test that way
                assert status == 400, (path, data, headers, encode, status, body)
                if path.startswith("/oauth/"):
                    assert body["error"] in ("invalid_request", "validation_failed"), body
                else:
                    assert plex_error_codes(body) in ([1098], [1116], [1000]), body
        assert await auth.fetchval("SELECT count(*) FROM accounts") == accounts
        assert await linkcode.fetchval("SELECT count(*) FROM pins") == pins
        assert await linkcode.fetchval("SELECT count(*) FROM device_codes") == codes
        assert await auth.fetchval("SELECT count(*) FROM accounts WHERE username = $1", name) == 0
    finally:
        await auth.close()
        await linkcode.close()
    # The same sign-up without the NUL succeeds: nothing was half done.
    status, _, _ = await call(stack, "POST", "/api/v2/users", source=source,
                              data={"email": f"{name}@example.org", "username": name, "password": PASSWORD},
                              headers={"X-Plex-Device-Name": "tv"})
    assert status == 201
    await asyncio.sleep(0)


async def test_broken_transfer_encodings_and_raw_header_bytes_answer_4xx_in_shape(stack: Stack) -> None:
    """What an HTTP client library refuses to send, sent on a raw socket to the edge."""
    port = stack.ports["edge"]
    requests = [
        (b"POST /api/v2/users HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: bogus\r\n\r\n", b"<errors>"),
        (b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", b'"error"'),
        (b"POST /api/v2/users HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"<errors>"),
        (b"POST /api/v2/users HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         b"<errors>"),
        (b"GET /api/v2/user HTTP/1.1\r\nHost: x\r\nX-Plex-Product: a\x00b\r\n\r\n", b"<errors>"),
        (b"GET /api/v2/user HTTP/1.1\r\nHost: x\r\nX-Plex-Product: a\x01b\r\nX-Plex-Token: x\r\n\r\n", b"<errors>"),
        (b"POST /signin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: bogus\r\n\r\n", b"<html"),
    ]
    for raw, shape in requests:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500 and shape in answer, (raw, answer[:300])
