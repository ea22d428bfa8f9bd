"""Property tests of the kernel's pure rules (hypothesis): no stack, part of `make test-unit`."""

from __future__ import annotations

import asyncio
import dataclasses
import string
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.linkcode.service import normalise_code
from services.notification.delivery import SmtpConfig
from services.web.routes import _next
from shared import events, plex
from shared.errors import ValidationFailed

pytestmark = pytest.mark.unit

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=12)
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                       timezones=st.just(UTC))


@given(id_=st.uuids(), type_=text, at=moments, producer=text, key=text,
       data=st.dictionaries(text, json_values, max_size=6), trace=st.dictionaries(text, text, max_size=3))
def test_envelope_round_trip_keeps_every_field(id_: uuid.UUID, type_: str, at: datetime, producer: str, key: str,
                                               data: dict[str, object], trace: dict[str, str]) -> None:
    env = events.Envelope(id=id_, type=type_, occurred_at=at, producer=producer, key=key, data=data, trace=trace)
    back = events.Envelope.decode(env.encode())
    assert back.occurred_at == at.replace(microsecond=back.occurred_at.microsecond) or back.occurred_at == at
    assert (back.id, back.type, back.producer, back.key, back.data, back.trace) == (
        id_, type_, producer, key, data, trace)


@given(st.binary(max_size=200))
def test_envelope_decode_raises_only_value_error(raw: bytes) -> None:
    try:
        events.Envelope.decode(raw)
    except ValueError:
        pass


def _sample(field: dataclasses.Field[object]) -> object:
    hint = str(field.type)
    if "bool" in hint:
        return True
    if "int" in hint:
        return 3
    if "list" in hint:
        return []
    if "dict" in hint:
        return {}
    return "x"


@pytest.mark.parametrize("type_", sorted(events.REGISTRY))
def test_every_registered_event_round_trips_through_the_registry(type_: str) -> None:
    cls = events.REGISTRY[type_]
    assert cls.TYPE == type_
    fields = [f for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING  # type: ignore[arg-type]
              and f.default_factory is dataclasses.MISSING]
    event = cls(**{f.name: _sample(f) for f in fields})
    env = events.envelope(event, producer="unit", key="k")
    back = events.Envelope.decode(env.encode())
    assert back.type == type_
    assert events.decode_data(back, events.REGISTRY[back.type]) == event


def test_registry_types_are_unique_past_tense_names() -> None:
    assert len({c for c in events.REGISTRY.values()}) == len(events.REGISTRY)
    for type_ in events.REGISTRY:
        assert type_ == type_.lower() and "." in type_, type_


TRUE = ["1", "true", "yes", "on"]
FALSE = ["0", "false", "no", "off"]


def _cased(words: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(words).flatmap(
        lambda w: st.tuples(*[st.sampled_from([c.lower(), c.upper()]) for c in w]).map("".join)).flatmap(
        lambda w: st.tuples(st.sampled_from(["", " ", "\t"]), st.sampled_from(["", " "])).map(
            lambda pad: pad[0] + w + pad[1]))


@given(_cased(TRUE))
def test_booleans_true_in_any_case(value: str) -> None:
    assert plex.parse_bool(value) is True


@given(_cased(FALSE))
def test_booleans_false_in_any_case(value: str) -> None:
    assert plex.parse_bool(value) is False


@given(text.filter(lambda v: v.strip().lower() not in TRUE + FALSE and v != ""))
def test_anything_else_is_not_a_boolean(value: str) -> None:
    with pytest.raises(ValidationFailed):
        plex.parse_bool(value)


@given(st.booleans())
def test_missing_boolean_takes_the_default(default: bool) -> None:
    assert plex.parse_bool(None, default) is default and plex.parse_bool("", default) is default


codes = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=25)


@given(codes, st.lists(st.sampled_from([" ", "-", "\t"]), max_size=4), st.randoms())
def test_code_normalisation_ignores_case_spaces_and_dashes(code: str, noise: list[str], rnd: object) -> None:
    chars = list(code)
    for n in noise:
        chars.insert(rnd.randrange(len(chars) + 1), n)  # type: ignore[attr-defined]
    assert normalise_code("".join(chars)) == code.upper()
    assert normalise_code(normalise_code(code)) == normalise_code(code)


@given(text)
def test_code_normalisation_is_bounded_and_idempotent(raw: str) -> None:
    once = normalise_code(raw)
    assert len(once) <= 64 and normalise_code(once) == once


def test_random_codes_cover_the_alphabet_evenly() -> None:
    """One draw per code, written in the alphabet's base: every character shows up in every
    position about equally often (20,000 codes of 4 from 31 symbols: about 645 each)."""
    from collections import Counter

    from services.linkcode.service import PIN_ALPHABET
    from shared.tokens import random_code

    drawn = [random_code(PIN_ALPHABET, 4) for _ in range(20_000)]
    assert all(len(c) == 4 and set(c) <= set(PIN_ALPHABET) for c in drawn)
    expected = len(drawn) / len(PIN_ALPHABET)
    for position in range(4):
        counts = Counter(c[position] for c in drawn)
        assert set(counts) == set(PIN_ALPHABET)
        assert all(abs(n - expected) < 0.25 * expected for n in counts.values()), counts


hosts = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,6}){0,2}", fullmatch=True)
userinfo = st.text(alphabet=string.printable.strip(), min_size=1, max_size=20)


@given(hosts, st.integers(1, 65535), st.booleans(), st.one_of(st.none(), st.tuples(userinfo, userinfo)),
       st.sampled_from(["", "?starttls=1", "?starttls=true", "?starttls=0"]))
def test_smtp_urls_parse_back_to_their_parts(host: str, port: int, implicit: bool, creds: tuple[str, str] | None,
                                             query: str) -> None:
    auth = f"{quote(creds[0], safe='')}:{quote(creds[1], safe='')}@" if creds else ""
    cfg = SmtpConfig.parse(f"{'smtps' if implicit else 'smtp'}://{auth}{host}:{port}{query}")
    assert (cfg.host, cfg.port, cfg.use_tls) == (host, port, implicit)
    assert cfg.start_tls == (query in ("?starttls=1", "?starttls=true"))
    assert (cfg.username, cfg.password) == (creds if creds else (None, None))


@given(st.sampled_from(["http", "ftp", "file", ""]))
def test_smtp_url_needs_an_smtp_scheme(scheme: str) -> None:
    with pytest.raises(ValueError):
        SmtpConfig.parse(f"{scheme}://mail.example.org")


@given(st.one_of(text, st.none(), st.from_regex(r"/[A-Za-z0-9/_?=&.-]{0,30}", fullmatch=True),
                 st.sampled_from(["//evil.example", "/\\evil", "https://evil.example/", "javascript:alert(1)",
                                  "/%2F/evil", "/./..//evil", "///evil", "/a/..//evil", "/.//evil",
                                  "/account/../../x"])))
def test_next_is_always_a_path_on_this_site(value: str | None) -> None:
    target = _next(value)
    parts = urlsplit(target)
    assert target.startswith("/") and not target.startswith("//") and "\\" not in target
    assert parts.scheme == "" and parts.netloc == ""
    # What a browser makes of it: dot segments resolved (RFC 3986 section 5.2.4).
    resolved = urljoin("https://hearth.example/a/b", target)
    assert urlsplit(resolved).netloc == "hearth.example" and not urlsplit(resolved).path.startswith("//")
    assert target == "/account" or target == value


# ------------------------------------------------------------------ X-Plex-* precedence


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"value": await plex.param(request, "X-Plex-Product")})


def _ask(header: str | None, query: str | None, form: str | None) -> object:
    async def run() -> object:
        app = web.Application()
        app.router.add_post("/echo", _echo)
        async with TestClient(TestServer(app)) as client:
            headers = {"X-Plex-Product": header} if header is not None else {}
            params = {"X-Plex-Product": query} if query is not None else {}
            data = FormData({"X-Plex-Product": form} if form is not None else {"other": "1"})
            r = await client.post("/echo", headers=headers, params=params, data=data)
            return (await r.json())["value"]

    return asyncio.run(run())


values = st.one_of(st.none(), st.text(alphabet=string.ascii_letters + string.digits + " -_.", max_size=12))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, values, values)
def test_plex_parameters_come_from_headers_then_query_then_form(header: str | None, query: str | None,
                                                               form: str | None) -> None:
    expected = next((v for v in (header, query, form) if v is not None), None)
    got = _ask(header, query, form)
    assert got == ((expected.strip() or None) if expected is not None else None)


# ------------------------------------------------------------------ typed dispatch


def test_dispatch_decodes_into_the_registered_type_and_counts_the_unknown() -> None:
    from shared.dispatch import UNKNOWN, EventHandlers

    seen: list[object] = []

    async def on_created(conn: object, ev: events.AccountCreated, env: events.Envelope) -> None:
        seen.append(ev)

    handlers = EventHandlers("unit.dispatch", {events.AccountCreated: on_created},
                             ignored=[events.PasswordResetRequested])
    created = events.envelope(events.AccountCreated(account_id="a", email="e@x", username="u"), producer="t", key="a")
    future = events.Envelope(id=uuid.uuid4(), type="thing.invented_later", occurred_at=events.utcnow(),
                             producer="t", key="k", data={})
    before = UNKNOWN.labels("unit.dispatch", "thing.invented_later")._value.get()

    async def run() -> None:
        await handlers(None, created)
        await handlers(None, future)

    asyncio.run(run())
    assert seen == [events.AccountCreated(account_id="a", email="e@x", username="u")]
    assert UNKNOWN.labels("unit.dispatch", "thing.invented_later")._value.get() == before + 1
    with pytest.raises(ValueError):
        EventHandlers("unit.bad", {events.AccountCreated: on_created}, ignored=[events.AccountCreated])


def test_every_registered_event_type_is_consumed_or_knowingly_ignored() -> None:
    """Adding an event is two steps, the dataclass and a handler: this catches the missing second."""
    from services.devicesession import events as devicesession_events
    from services.devicesession.service import Topics
    from services.notification import events as notification_events
    from shared.dispatch import DECLARED

    devicesession_events.make_auth_handler(Topics(sessions_revoked="s", events="e"))
    devicesession_events.make_ack_handler(None)  # type: ignore[arg-type]  # declares; never called here
    assert notification_events.HANDLERS.consumer in DECLARED
    # sessions.revoked is what every holder kit consumes, through its own broadcast consumer.
    by_kit = {events.SessionsRevoked.TYPE}
    known = {t for h in DECLARED.values() if not h.consumer.startswith("unit.") for t in h.handlers} | {
        t for h in DECLARED.values() if not h.consumer.startswith("unit.") for t in h.ignored} | by_kit
    assert sorted(set(events.REGISTRY) - known) == []


def test_hearth_plex_error_codes_each_mean_one_thing() -> None:
    """Hearth's own Plex codes (1110 and up) are documented in the README, one meaning each."""
    import importlib
    import inspect

    from shared.errors import HearthError

    modules = ["services.auth.errors", "services.auth.two_factor", "services.auth.passkeys",
               "services.linkcode.errors", "services.devicesession.errors", "shared.errors"]
    meaning: dict[int, set[str]] = {}
    for name in modules:
        for _, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
            if issubclass(cls, HearthError) and "plex_code" in cls.__dict__ and cls.plex_code >= 1110:
                meaning.setdefault(cls.plex_code, set()).add(cls.code)
    assert {c: m for c, m in meaning.items() if len(m) > 1} == {}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert [c for c in sorted(meaning) if f"| {c} |" not in readme and f"| {c} /" not in readme
            and f"/ {c} |" not in readme] == []
