"""Resources: the account's servers and players, with the connections each published.

**Publishing.** A Plex Media Server tells plex.tv where it can be reached with
``PUT /devices/{clientIdentifier}?Connection[][uri]=http://192.168.1.10:32400&...&X-Plex-Token=...``
(the server's own token; one ``Connection[][uri]`` per address, repeated; Roku and other players do
the same). Some publishers also send ``Connection[][protocol]``, ``[address]``, ``[port]`` and
``[local]`` in the same order. Hearth accepts that shape, in the query string or a form body:
``protocol``, ``address`` and ``port`` default to the URI's own, ``local`` to whether the address is
a private, loopback or link-local one (or ``localhost``/``*.local``). Only the device that the token
belongs to can publish its connections (any other device identifier answers 404); a publication
replaces the previous list (at most 20, each an absolute http(s) URI).

**Listing.** ``GET /api/v2/resources`` (JSON or XML, python-plexapi, Seerr) and the older
``GET /api/resources?includeHttps=1&includeRelay=1`` (always XML unless ``.json``: Overseerr's server
picker, Tautulli's wizard, go-plex-client, plex-api.rs) list them, each connection with
``protocol address port uri local``. ``includeHttps``/``includeRelay`` are accepted; Hearth relays
nothing, so every published connection is listed and ``relay`` is 0.

**accessToken.** Every listed resource is owned by the caller (Hearth has no sharing yet), and its
``accessToken`` is the caller's own token: Hearth stores only HMACs of tokens, so it cannot hand out
the server's token, and a resource server that validates tokens with Hearth (any holder: the sample
holder, a media server using ``shared.holder``) accepts its owner's session. python-plexapi's
``MyPlexResource.connect()`` then reaches the server as the owner; signing out or a password change
with sign-out ends that access with the session.
"""

from __future__ import annotations

import ipaddress
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from services.devicesession import routes, store
from services.devicesession.errors import DeviceNotFound
from shared import plex
from shared.app import POOL
from shared.errors import ValidationFailed

MAX_CONNECTIONS = 20
# LAN and loopback ranges (RFC 1918, RFC 4193, link-local, loopback): a connection there is "local".
_LOCAL_NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "::1/128", "fc00::/7",
    "fe80::/10"))
_FIELDS = ("protocol", "address", "port", "local")


def _is_local(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".local"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in _LOCAL_NETS)


def parse_connections(values: Any) -> list[dict[str, Any]]:
    """``Connection[][uri]`` (repeated) and the optional parallel fields, validated."""
    uris = values.getall("Connection[][uri]", [])
    if not uris:
        raise ValidationFailed("give at least one Connection[][uri]", field="Connection[][uri]")
    if len(uris) > MAX_CONNECTIONS:
        raise ValidationFailed(f"at most {MAX_CONNECTIONS} connections", field="Connection[][uri]")
    extra = {f: values.getall(f"Connection[][{f}]", []) for f in _FIELDS}
    extra = {f: v if len(v) == len(uris) else [] for f, v in extra.items()}
    out = []
    for i, uri in enumerate(uris):
        uri = uri.strip()
        try:
            parts = urllib.parse.urlsplit(uri)
            port = parts.port
        except ValueError:
            raise ValidationFailed(f"not a valid URI: {uri[:80]!r}", field="Connection[][uri]") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname or len(uri) > 512 or any(
                ord(c) < 0x21 or ord(c) > 0x7E for c in uri):
            raise ValidationFailed(f"a connection must be an absolute http or https URI: {uri[:80]!r}",
                                   field="Connection[][uri]")
        address = (extra["address"][i] if extra["address"] else "") or parts.hostname
        given_port = extra["port"][i] if extra["port"] else ""
        try:
            port = int(given_port) if given_port else port or (443 if scheme == "https" else 80)
        except ValueError:
            raise ValidationFailed("Connection[][port] must be an integer", field="Connection[][port]") from None
        if not 0 < port < 65536:
            raise ValidationFailed("Connection[][port] must be 1 to 65535", field="Connection[][port]")
        local = (plex.parse_bool(extra["local"][i]) if extra["local"] and extra["local"][i] != ""
                 else _is_local(address))
        protocol = (extra["protocol"][i] if extra["protocol"] else "") or scheme
        if protocol not in ("http", "https"):
            raise ValidationFailed("Connection[][protocol] must be http or https", field="Connection[][protocol]")
        out.append({"protocol": protocol, "address": address[:255], "port": port, "uri": uri, "local": local})
    return out


async def publish(request: web.Request) -> web.Response:
    info = await routes._account(request)
    if request.match_info["device_id"] != info.client_identifier:
        raise DeviceNotFound()
    values = request.query if "Connection[][uri]" in request.query else await plex.form(request)
    connections = parse_connections(values)
    await store.set_connections(request.app[POOL], info.device_id, connections)
    conn_xml = [plex.element("Connection", c) for c in connections]
    return plex.respond(
        request,
        xml=plex.element("Device", {"clientIdentifier": info.client_identifier, "id": info.device_id}, *conn_xml),
        json={"clientIdentifier": info.client_identifier, "id": info.device_id, "connections": connections},
    )


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _resources(request: web.Request) -> list[tuple[store.Device, str, list[dict[str, Any]]]]:
    info = await routes._account(request)
    token = await plex.param(request, "X-Plex-Token") or ""
    devices = await store.list_devices(request.app[POOL], info.account_id)
    out = []
    for d in devices:
        dev = d.device
        provides = dev.provides or dev.kind
        if "server" not in provides and "player" not in provides:
            continue
        conns = [{"protocol": c.get("protocol", "http"), "address": c.get("address", ""), "port": c.get("port", 0),
                  "uri": c.get("uri", ""), "local": bool(c.get("local", True)), "relay": False,
                  "IPv6": ":" in str(c.get("address", ""))} for c in dev.connections]
        out.append((dev, token, conns))
    return out


def _attrs(dev: store.Device, token: str, provides: str) -> dict[str, Any]:
    return {
        "name": dev.device_name or dev.product, "product": dev.product, "productVersion": dev.version,
        "platform": dev.platform, "platformVersion": dev.platform_version, "device": dev.device,
        "clientIdentifier": dev.client_identifier, "provides": provides, "publicAddress": dev.public_address,
        "accessToken": token, "owned": True, "home": False, "synced": False, "relay": False,
        "presence": time.time() - dev.last_seen_at.timestamp() < 3600, "httpsRequired": False,
        "publicAddressMatches": True, "dnsRebindingProtection": False, "natLoopbackSupported": False,
    }


async def list_resources(request: web.Request) -> web.Response:
    """``/api/v2/resources``: ``<resources><resource><connections><connection/>`` or a JSON list."""
    items_xml, items_json = [], []
    for dev, token, conns in await _resources(request):
        attrs = {**_attrs(dev, token, dev.provides or dev.kind), "createdAt": _iso(dev.created_at),
                 "lastSeenAt": _iso(dev.last_seen_at), "ownerId": "", "sourceTitle": ""}
        items_xml.append(plex.element("resource", attrs, plex.element(
            "connections", {}, *(plex.element("connection", c) for c in conns))))
        items_json.append({**attrs, "ownerId": None, "sourceTitle": None, "connections": conns})
    return plex.respond(request, xml=plex.element("resources", {}, *items_xml), json=items_json)


async def list_resources_legacy(request: web.Request) -> web.Response:
    """``/api/resources``: ``<MediaContainer size><Device ...><Connection/>``, epoch times, 1/0 flags."""
    items_xml, items_json = [], []
    for dev, token, conns in await _resources(request):
        attrs = {**_attrs(dev, token, dev.provides or dev.kind), "createdAt": int(dev.created_at.timestamp()),
                 "lastSeenAt": int(dev.last_seen_at.timestamp()), "ownerID": "", "sourceTitle": ""}
        items_xml.append(plex.element("Device", attrs, *(plex.element("Connection", {
            k: c[k] for k in ("protocol", "address", "port", "uri", "local")}) for c in conns)))
        items_json.append({**attrs, "Connection": conns})
    return plex.respond(request, xml=plex.element("MediaContainer", {"size": len(items_xml)}, *items_xml),
                        json={"MediaContainer": {"size": len(items_json), "Device": items_json}})


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v2/resources", list_resources)
    r.add_get("/api/v2/resources.json", list_resources)
    r.add_get("/api/v2/resources.xml", list_resources)
    r.add_get("/api/resources", list_resources_legacy)
    r.add_get("/api/resources.xml", list_resources_legacy)
    r.add_get("/api/resources.json", list_resources_legacy)
    r.add_put("/devices/{device_id}.xml", publish)
    r.add_put("/devices/{device_id}.json", publish)
    r.add_put("/devices/{device_id}", publish)
