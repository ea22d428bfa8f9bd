"""notification's consumer: ``auth.events``, ``devicesession.events`` and ``linkcode.events``
become delivery rows through the typed handlers of ``service.py``, idempotently, in the runner's
transaction. Every type on those topics is either handled here or knowingly ignored."""

from __future__ import annotations

from services.notification import service
from shared.dispatch import EventHandlers
from shared.events import (
    AccountCreated,
    AccountResetRequired,
    AccountsResetRequired,
    DeviceCodeApproved,
    DeviceRemoved,
    PasswordChanged,
    PasswordResetRequested,
    PasswordsChanged,
    PinLinked,
    ServerClaimed,
    TwoFactorDisabled,
    TwoFactorEnabled,
    TwoFactorRecoveryCodeUsed,
)

HANDLERS = EventHandlers("notification", {
    AccountCreated: service.account_created,
    PasswordResetRequested: service.reset_requested,
    PasswordChanged: service.password_changed,
    AccountResetRequired: service.reset_required,
    AccountsResetRequired: service.resets_required,
    PinLinked: service.pin_linked,
    DeviceCodeApproved: service.device_code_approved,
    ServerClaimed: service.server_claimed,
    TwoFactorEnabled: service.two_factor_enabled,
    TwoFactorDisabled: service.two_factor_disabled,
    TwoFactorRecoveryCodeUsed: service.recovery_code_used,
}, ignored=[
    PasswordsChanged,  # the breach batch: its emails come from accounts.reset_required
    DeviceRemoved,  # the person removed it themselves
])
