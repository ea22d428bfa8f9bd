"""Issue 16, findings 8 and 9: no secret in the edge's logs; browser hardening on the web pages;
TRUSTED_PROXIES decides whose X-Forwarded-For and X-Forwarded-Proto are believed."""

from __future__ import annotations

import secrets

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from deploy.launcher import Stack
from shared.app import SETTINGS, client_address, is_https
from shared.settings import CommonSettings
from tests.security.helpers import call, fresh_address

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]


async def test_tokens_in_query_strings_reach_no_log(stack: Stack) -> None:
    plex_token = "plextok" + secrets.token_hex(12)
    claim = "claim-" + secrets.token_hex(12)
    source = fresh_address()
    await call(stack, "GET", f"/api/v2/user?X-Plex-Token={plex_token}", source=source)
    await call(stack, "POST", f"/api/claim/exchange?token={claim}", source=source)
    # What used to make nginx log the request line: a body too large, a body buffered to disk,
    # an upstream that resets the connection (the broken gzip body).
    await call(stack, "POST", f"/api/v2/users/signin?X-Plex-Token={plex_token}", source=source,
               data=b"x" * (2 * 1024 * 1024))
    await call(stack, "POST", f"/api/claim/exchange?token={claim}", source=source, data=b"y" * (200 * 1024))
    await call(stack, "POST", f"/api/v2/users/signin?X-Plex-Token={plex_token}", source=source,
               data=b"not gzip", headers={"Content-Encoding": "gzip"})
    nginx = stack.run_dir / "nginx"
    access = (nginx / "access.log").read_text(errors="replace")
    assert "/api/claim/exchange" in access and "/api/v2/user " in access.replace('"', " ")
    everything = access + (nginx / "error.log").read_text(errors="replace") + "".join(
        p.read_text(errors="replace") for p in (stack.run_dir / "logs").glob("*.log"))
    assert plex_token not in everything and claim not in everything


async def test_web_pages_carry_the_security_headers(stack: Stack) -> None:
    for path in ("/signin", "/signup", "/forgot", "/account", "/no-such-page", "/static/hearth.css"):
        status, _, headers = await call(stack, "GET", path, json_accept=False)
        assert status < 500
        csp = headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "script-src 'self'" in csp
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "same-origin"
        assert headers["X-Content-Type-Options"] == "nosniff"


async def test_cookies_are_secure_behind_a_trusted_tls_proxy_and_not_on_plain_http(stack: Stack) -> None:
    # Over the edge on plain HTTP (a client's own X-Forwarded-Proto is replaced by the edge's).
    status, _, headers = await call(stack, "GET", "/signin", json_accept=False, headers={"X-Forwarded-Proto": "https"})
    cookies = headers.getall("Set-Cookie")
    assert cookies and all("Secure" not in c for c in cookies)
    # A TLS-terminating proxy on a trusted address (loopback) in front of web.
    async with aiohttp.ClientSession() as http, http.get(stack.url("web") + "/signin",
                                                         headers={"X-Forwarded-Proto": "https"}) as r:
        cookies = r.headers.getall("Set-Cookie")
    assert cookies and all("Secure" in c for c in cookies)


@pytest.mark.parametrize("target", ["//evil.example", "/.//evil.example", "/a/..//evil.example", "/./",
                                    "/x//y", "https://evil.example", "/%2F/evil.example"])
async def test_next_that_normalises_to_another_origin_is_refused(stack: Stack, target: str) -> None:
    status, body, _ = await call(stack, "GET", "/signin", params={"next": target}, json_accept=False)
    assert status == 200
    assert 'name="next" value="/account"' in body


def _request(remote: str, headers: dict[str, str], trusted: str = "127.0.0.0/8,::1/128") -> object:
    app = aiohttp.web.Application()
    app[SETTINGS] = CommonSettings(internal_api_secret="x", token_hmac_key="A" * 44, holder_secret="y",
                                   trusted_proxies=trusted)

    class Transport:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return (remote, 40000) if name == "peername" else default

    return make_mocked_request("GET", "/", headers=headers, app=app, transport=Transport())


def test_trusted_proxies_decide_whose_forwarded_headers_are_believed() -> None:
    # From an untrusted peer nothing forwarded is believed.
    r = _request("203.0.113.9", {"X-Forwarded-For": "10.1.1.1", "X-Forwarded-Proto": "https"})
    assert client_address(r) == "203.0.113.9" and not is_https(r)  # type: ignore[arg-type]
    # From the loopback edge, the hop it added is the client; a client-chosen hop before it is not.
    r = _request("127.0.0.1", {"X-Forwarded-For": "6.6.6.6, 198.51.100.7"})
    assert client_address(r) == "198.51.100.7"  # type: ignore[arg-type]
    # Behind a trusted TLS proxy network, hops are walked back to the first untrusted one.
    r = _request("10.0.0.2", {"X-Forwarded-For": "6.6.6.6, 198.51.100.7, 10.0.0.5", "X-Forwarded-Proto": "https"},
                 trusted="10.0.0.0/8")
    assert client_address(r) == "198.51.100.7" and is_https(r)  # type: ignore[arg-type]
    r = _request("10.0.0.2", {"X-Forwarded-For": "garbage, 10.0.0.5"}, trusted="10.0.0.0/8")
    assert client_address(r) == "10.0.0.5"  # type: ignore[arg-type]
