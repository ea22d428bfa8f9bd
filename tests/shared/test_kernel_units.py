"""Unit tests of the shared kernel's pure pieces: settings, events, tokens, sealing, passwords."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import uuid

import pytest
from pydantic import ValidationError

from shared import crypto, events, tokens
from shared.passwords import HashParams, Passwords
from shared.settings import CommonSettings, load, with_database

SECRETS = {"internal_api_secret": "x" * 32, "token_hmac_key": "a" * 43, "holder_secret": "h" * 32}


def test_settings_are_frozen_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_NAME", "auth")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db.example:5432/postgres?sslmode=disable")
    s = CommonSettings(**SECRETS)
    assert s.db_url() == "postgresql://u:p@db.example:5432/hearth_auth?sslmode=disable"
    with pytest.raises(ValidationError):
        s.http_port = 1  # type: ignore[misc]
    assert "x" * 32 not in repr(s)  # secrets never print


def test_missing_settings_are_listed_and_exit(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("INTERNAL_API_SECRET", "TOKEN_HMAC_KEY", "HOLDER_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        load(CommonSettings)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "INTERNAL_API_SECRET" in err and "TOKEN_HMAC_KEY" in err and "HOLDER_SECRET" in err


def test_short_hmac_key_is_rejected() -> None:
    with pytest.raises(ValidationError):
        CommonSettings(**{**SECRETS, "token_hmac_key": "c2hvcnQ"})


def test_topic_prefix_applies_to_topics_and_groups() -> None:
    s = CommonSettings(**SECRETS, topic_prefix="t1.")
    assert s.topic(events.SESSIONS_REVOKED) == "t1.sessions.revoked"
    assert s.group("holder.web") == "t1.holder.web"


def test_with_database_keeps_credentials_and_query() -> None:
    assert with_database("postgresql://a:b@h:1/x?q=1", "y") == "postgresql://a:b@h:1/y?q=1"


def test_envelope_round_trip_and_typed_payload() -> None:
    ev = events.PasswordChanged(account_id="a1", email="e@x", username="u", cause="reset", revoke_sessions=True,
                                keep_session_id=None)
    env = events.envelope(ev, producer="auth", key="a1")
    back = events.Envelope.decode(env.encode())
    assert back == env
    typed = events.decode_data(back, events.PasswordChanged)
    assert typed == ev
    assert dict(env.headers())["event_type"] == b"password.changed"


def test_decode_ignores_unknown_fields_added_later() -> None:
    env = events.envelope(events.AccountCreated(account_id="a", email="e", username="u"), producer="p", key="a")
    newer = events.Envelope(env.id, env.type, env.occurred_at, env.producer, env.key, {**env.data, "locale": "fr"})
    assert events.decode_data(newer, events.AccountCreated).email == "e"


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"id": "nope"}', b'{"id": "%s"}' % str(uuid.uuid4()).encode()])
def test_malformed_envelopes_raise_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        events.Envelope.decode(raw)


def test_token_digests_are_domain_separated_and_compared_in_constant_time() -> None:
    key = b"k" * 32
    t = tokens.new_token()
    assert len(t) >= 32  # 192 bits in urlsafe base64
    assert tokens.digest(key, t, purpose="session") != tokens.digest(key, t, purpose="reset")
    assert tokens.same(tokens.digest(key, t, purpose="session"), tokens.digest(key, t, purpose="session"))
    assert not tokens.same("a", "b")


def test_sealed_values_open_only_with_the_right_key_and_context() -> None:
    spec = crypto.new_key_spec("k1")
    sealer = crypto.Sealer(spec)
    sealed = sealer.seal("secret-token", context="acct-1")
    assert "secret-token" not in sealed
    assert sealer.open(sealed, context="acct-1") == "secret-token"
    with pytest.raises(crypto.SealError):
        sealer.open(sealed, context="acct-2")
    with pytest.raises(crypto.SealError):
        crypto.Sealer(crypto.new_key_spec("k1")).open(sealed, context="acct-1")
    rotated = crypto.Sealer(crypto.new_key_spec("k2") + "," + spec)
    assert rotated.open(sealed, context="acct-1") == "secret-token"
    assert rotated.seal("x", context="c").split(".")[1] == "k2"


FAST = HashParams(memory_kib=8 * 1024, time_cost=1, parallelism=1)


async def test_password_hash_verify_and_rehash_on_parameter_change() -> None:
    pw = Passwords(FAST, peppers={"p1": b"s" * 32})
    record = await pw.hash("correct horse battery staple")
    assert record.startswith("p1$$argon2id$")
    assert (await pw.verify(record, "correct horse battery staple")).ok
    assert not (await pw.verify(record, "wrong")).ok
    stronger = Passwords(HashParams(memory_kib=9 * 1024, time_cost=1, parallelism=1), peppers={"p1": b"s" * 32})
    assert (await stronger.verify(record, "correct horse battery staple")).needs_rehash
    pw.close()
    stronger.close()


async def test_pepper_rotation_verifies_old_records_and_asks_for_rehash() -> None:
    old = Passwords(FAST, peppers={"p1": b"1" * 32})
    record = await old.hash("a long passphrase")
    new = Passwords(FAST, peppers={"p2": b"2" * 32, "p1": b"1" * 32})
    result = await new.verify(record, "a long passphrase")
    assert result.ok and result.needs_rehash
    without = Passwords(FAST, peppers={"p2": b"2" * 32})
    assert not (await without.verify(record, "a long passphrase")).ok  # the database alone is not enough
    for p in (old, new, without):
        p.close()


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are a Linux feature")
async def test_hashing_threads_run_below_normal_priority_and_the_event_loop_does_not() -> None:
    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = own_nice()
    pw = Passwords(FAST, nice=3)
    await pw.hash("warms the pool up")
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(pw.executor, own_nice) == min(base + 3, 19)
    assert own_nice() == base  # only the hashing threads: the process and its event loop keep theirs
    assert (await pw.verify(await pw.hash("still hashes"), "still hashes")).ok
    pw.close()


async def test_dummy_verify_costs_about_as_much_as_a_real_one() -> None:
    pw = Passwords(HashParams(memory_kib=19 * 1024, time_cost=2, parallelism=1))
    record = await pw.hash("some password")
    t0 = time.perf_counter()
    for _ in range(5):
        await pw.verify(record, "wrong password")
    real = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
        await pw.verify_dummy("wrong password")
    dummy = time.perf_counter() - t0
    assert 0.5 < dummy / real < 2.0
    pw.close()
