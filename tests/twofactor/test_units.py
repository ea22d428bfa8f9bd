"""Two-step verification's pure parts, without the stack."""

from __future__ import annotations

import pyotp

from services.auth.passkeys import relying_party
from services.auth.two_factor import TwoFactor, matching_step, new_recovery_code, normalise_recovery, otpauth_uri


def test_matching_step_accepts_one_step_of_drift_either_way_and_nothing_else() -> None:
    secret = pyotp.random_base32(32)
    now = 1_800_000_015.0
    t = int(now // 30)
    totp = pyotp.TOTP(secret)
    for offset in (-1, 0, 1):
        assert matching_step(secret, totp.generate_otp(t + offset), now) == t + offset
    for offset in (-3, -2, 2, 3):
        code = totp.generate_otp(t + offset)
        if code not in {totp.generate_otp(t + o) for o in (-1, 0, 1)}:
            assert matching_step(secret, code, now) is None
    assert matching_step(secret, "12345", now) is None
    assert matching_step(secret, "abcdef", now) is None
    assert matching_step(secret, totp.generate_otp(t) + "0", now) is None


def test_uri_and_recovery_codes() -> None:
    assert otpauth_uri("ABCD", "al ice") == "otpauth://totp/Hearth:al%20ice?secret=ABCD&issuer=Hearth"
    codes = {new_recovery_code() for _ in range(200)}
    assert len(codes) == 200
    assert all(len(c) == 11 and c[5] == "-" for c in codes)
    assert normalise_recovery(" ABCDE-fghjk ") == "abcdefghjk"


def test_password_with_appended_digits() -> None:
    assert TwoFactor.split_appended("a good passphrase123456") == ("a good passphrase", "123456")
    assert TwoFactor.split_appended("123456") is None
    assert TwoFactor.split_appended("passphrase12345") is None


def test_relying_party_from_public_base_url() -> None:
    class S:
        public_base_url = "https://accounts.example.org:8443/base"

    assert relying_party(S()) == ("accounts.example.org", "https://accounts.example.org:8443")  # type: ignore[arg-type]
