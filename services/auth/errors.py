"""auth's error types and the Plex error codes Hearth adds for them (README lists them)."""

from __future__ import annotations

from shared.errors import Conflict, HearthError, InvalidToken, Throttled, Unauthorized, ValidationFailed

__all__ = ["InvalidToken"]  # shared: every service refuses a bad X-Plex-Token the same way


class BadCredentials(Unauthorized):
    code = "invalid_credentials"
    title = "User could not be authenticated"
    plex_code = 1001


class ResetRequired(HearthError):
    status = 403
    code = "password_reset_required"
    title = "This account requires a password reset: use the link we emailed you, or request a new one"
    plex_code = 1110


class SignInThrottled(Throttled):
    code = "too_many_attempts"
    title = "Too many failed sign-in attempts; try again later"
    plex_code = 1111


class WeakPassword(ValidationFailed):
    code = "weak_password"
    title = "The password does not meet the policy"
    plex_code = 1112


class InvalidResetToken(HearthError):
    status = 400
    code = "invalid_reset_token"
    title = "This reset link is invalid, expired or already used; request a new one"
    plex_code = 1113


class EmailTaken(Conflict):
    code = "email_taken"
    title = "That email address is already in use"
    plex_code = 1114


class UsernameTaken(Conflict):
    code = "username_taken"
    title = "That username is already taken"
    plex_code = 1115


class InvalidField(ValidationFailed):
    code = "invalid_field"
    title = "A field is missing or invalid"
    plex_code = 1116
