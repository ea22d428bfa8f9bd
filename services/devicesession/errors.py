"""devicesession's error types."""

from __future__ import annotations

from shared.errors import HearthError, NotFound, Unauthorized


class InvalidToken(Unauthorized):
    code = "invalid_token"
    title = "User could not be authenticated"
    plex_code = 1001


class HolderUnauthorized(Unauthorized):
    code = "invalid_client"
    title = "Holder credentials are missing or wrong"


class DeviceNotFound(NotFound):
    code = "device_not_found"
    title = "No such device"
    plex_code = 1404


class InvalidMint(HearthError):
    status = 400
    code = "invalid_request"
    title = "The session request is not valid"
