"""Plex-compatible rendering and request parsing.

- XML by default (python-plexapi parses every answer as XML). JSON when the path ends in ``.json``;
  under ``/api/v2/`` (and Hearth's own ``/api/claim/``) also when ``Accept`` contains
  ``application/json``. Elsewhere (``/users/account``, ``/api/resources``, ``/api/users``,
  ``/devices``) the path alone decides, as on plex.tv: Overseerr and go-plex-client send
  ``Accept: application/json`` there and parse the answer as XML.
- ``X-Plex-*`` values are read from headers, then the query string, then the form body
  (python-plexauth posts them as form fields).
- Booleans render as ``1``/``0`` in XML; request booleans parse case-insensitively.
"""

from __future__ import annotations

import codecs
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from shared.errors import HearthError, ValidationFailed

PLEX_HEADERS = (
    "X-Plex-Client-Identifier",
    "X-Plex-Product",
    "X-Plex-Version",
    "X-Plex-Platform",
    "X-Plex-Platform-Version",
    "X-Plex-Device",
    "X-Plex-Device-Name",
    "X-Plex-Model",
    "X-Plex-Vendor",
    "X-Plex-Provides",
    "X-Plex-Token",
)
MAX_FIELD = 512
# A NUL never reaches PostgreSQL (text cannot hold it) nor anything else: refused in every field.
_NUL = re.compile(r"[\x00\ud800-\udfff]")
# Single-line values (headers, identifiers, logins, codes) hold no control character at all.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_FORM: web.RequestKey[MultiDictProxy[str]] = web.RequestKey("hearth_form", MultiDictProxy)


_ACCEPT_DECIDES = ("/api/v2/", "/api/claim/")


def wants_json(request: web.Request) -> bool:
    path = request.path
    if path.endswith(".json"):
        return True
    if path.endswith(".xml") or not path.startswith(_ACCEPT_DECIDES):
        return False
    return "application/json" in request.headers.get("Accept", "")


def parse_bool(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValidationFailed(f"not a boolean: {value[:20]!r}")


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ValidationFailed("the body must be JSON") from None
    if not isinstance(body, dict):
        raise ValidationFailed("the body must be a JSON object")
    _no_nul(body)
    return body


def _no_nul(value: Any, name: str = "body") -> None:
    """No string anywhere in a JSON body holds a NUL (PostgreSQL text cannot)."""
    if isinstance(value, str):
        check_text(name, value, single_line=False)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(str(k), str(k), single_line=False)
            _no_nul(v, str(k))
    elif isinstance(value, list):
        for v in value:
            _no_nul(v, name)


def check_text(name: str, value: str, *, single_line: bool = True) -> str:
    """``value`` unless it holds a NUL (or, for single-line values, any control character): 400."""
    if (_CONTROL if single_line else _NUL).search(value):
        raise ValidationFailed(f"{name[:40]} contains a control character", field=name[:40])
    return value


def check_charset(request: web.Request) -> None:
    """The body's declared charset must be a text encoding Python knows (else 400, before parsing)."""
    charset = request.charset
    if charset is None:
        return
    try:
        known = codecs.lookup(charset)._is_text_encoding  # type: ignore[attr-defined]
    except LookupError:
        known = False
    if not known:
        raise ValidationFailed("the body's charset is not supported", field="charset")


async def _post(request: web.Request) -> MultiDict[str]:
    check_charset(request)
    try:
        raw = await request.post()
    except web.HTTPException:
        raise
    except Exception:
        # Parsing reads nothing but the body, so whatever it raises is the body's fault: aiohttp
        # raises ValueError, LookupError, RuntimeError, InvalidHeader... for a malformed multipart
        # body, an unknown part charset or Content-Transfer-Encoding.
        raise ValidationFailed("the form body could not be parsed") from None
    return MultiDict((k, v) for k, v in raw.items() if isinstance(v, str))


async def form(request: web.Request) -> MultiDictProxy[str]:
    """The request's form fields (urlencoded or multipart), or an empty mapping; cached. Any value
    holding a NUL is refused (400) before a handler sees it."""
    cached = request.get(_FORM)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    data: MultiDictProxy[str]
    if request.body_exists and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        data = MultiDictProxy(await _post(request))
    elif request.body_exists and request.content_type == "application/json":
        obj = await json_object(request)
        data = MultiDictProxy(MultiDict((str(k), _scalar(v)) for k, v in obj.items() if v is not None))
    else:
        if request.body_exists and await request.read():  # read() enforces the body size limit (413)
            raise HearthError("send form fields (application/x-www-form-urlencoded, multipart/form-data) or JSON",
                              status=415, code="unsupported_media_type", plex_code=1415)
        data = MultiDictProxy(MultiDict())
    for k, v in data.items():
        check_text(k, k)
        check_text(k, v, single_line=False)
    request[_FORM] = data
    return data


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return v if isinstance(v, str) else orjson.dumps(v).decode()


async def param(request: web.Request, name: str) -> str | None:
    """A value from headers, then query, then form; stripped; ``None`` when absent or empty."""
    value = request.headers.get(name)
    if value is None:
        value = request.query.get(name)
    if value is None:
        value = (await form(request)).get(name)
    if value is None:
        return None
    value = value.strip()
    if len(value) > MAX_FIELD:
        raise ValidationFailed(f"{name} is too long", field=name)
    check_text(name, value)
    return value or None


async def field(request: web.Request, name: str, *, max_len: int = MAX_FIELD) -> str | None:
    """A form (or query) field, for non-header values such as ``login`` or ``code``."""
    value = (await form(request)).get(name)
    if value is None:
        value = request.query.get(name)
    if value is None:
        return None
    if len(value) > max_len:
        raise ValidationFailed(f"{name} is too long", field=name)
    check_text(name, value)
    return value


@dataclass(frozen=True)
class ClientInfo:
    """The device headers a Plex client sends."""

    client_identifier: str | None
    product: str | None
    version: str | None
    platform: str | None
    platform_version: str | None
    device: str | None
    device_name: str | None
    model: str | None
    vendor: str | None
    provides: str | None
    token: str | None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "token"}


async def client_info(request: web.Request) -> ClientInfo:
    values = [await param(request, h) for h in PLEX_HEADERS]
    return ClientInfo(*values)


def xml_bool(v: bool | None) -> str:
    return "1" if v else "0"


def _attr(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return xml_bool(v)
    return str(v)


def element(
    tag: str, attrs: Mapping[str, Any] | None = None, *children: ET.Element, text: str | None = None
) -> ET.Element:
    el = ET.Element(tag, {k: _attr(v) for k, v in (attrs or {}).items()})
    for c in children:
        el.append(c)
    if text is not None:
        el.text = text
    return el


def xml_bytes(root: ET.Element) -> bytes:
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


def respond(
    request: web.Request,
    *,
    xml: ET.Element | bytes | None,
    json: Any,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Render XML or JSON as the client asked."""
    if wants_json(request):
        return web.Response(
            body=orjson.dumps(json), status=status, content_type="application/json", headers=headers
        )
    body = xml if isinstance(xml, bytes) else xml_bytes(xml) if xml is not None else b""
    return web.Response(body=body, status=status, content_type="application/xml", headers=headers)


def error_response(request: web.Request, err: HearthError) -> web.Response:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    entry: dict[str, Any] = {"code": err.plex_code, "message": err.detail, "status": err.status}
    if err.retry_after is not None:
        entry["retryAfter"] = err.retry_after
    if err.field:
        entry["field"] = err.field
    return respond(
        request,
        xml=element("errors", {}, element("error", entry)),
        json={"errors": [entry]},
        status=err.status,
        headers=headers,
    )
