"""notification's rendering: a delivery row and its recipient become a message (Jinja2 templates,
``<kind>.subject.txt``, ``.txt`` and ``.html``; ``TEMPLATE_DIR`` overrides the built-in ones).

Secrets: a reset token stays sealed in the row and is opened only here, to render the message; it
is never logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2

from services.notification import store
from services.notification.settings import Settings
from shared.crypto import Sealer
from shared.events import parse_time

HOW = {"reset": "through a password reset link", "change": "from your account settings",
       "forced": "by an administrator"}


@dataclass(frozen=True)
class Rendered:
    to: str
    subject: str
    text: str
    html: str


class Renderer:
    def __init__(self, settings: Settings) -> None:
        loaders: list[jinja2.BaseLoader] = []
        if settings.template_dir:
            loaders.append(jinja2.FileSystemLoader(settings.template_dir))
        loaders.append(jinja2.FileSystemLoader(Path(__file__).parent / "templates"))
        self.env = jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), autoescape=jinja2.select_autoescape(
            enabled_extensions=("html",), default_for_string=False), undefined=jinja2.StrictUndefined)
        self.text_env = self.env  # .txt templates are not escaped (select_autoescape: .html only)
        self.s = settings
        self.sealer = Sealer(settings.seal_keys.get_secret_value())
        self.base = settings.public_base_url.rstrip("/")

    def _when(self, value: str | None) -> str:
        if not value:
            return ""
        try:
            return parse_time(value).strftime("%Y-%m-%d %H:%M UTC")
        except ValueError:
            return value

    def context(self, d: store.Delivery, email: str, username: str) -> dict[str, Any]:
        c = dict(d.context)
        ctx: dict[str, Any] = {"product": self.s.product_name, "email": email, "username": username,
                               "forgot_url": self.base + "/forgot", "account_url": self.base + "/account"}
        if d.kind in ("password_reset", "reset_required"):
            sealed = c.get("sealed_token")
            link = self.base + "/forgot"
            if sealed:
                token = self.sealer.open(sealed, context=str(d.account_id))
                link = _with_query(c.get("reset_url") or self.base + "/reset", token=token)
            ctx.update(link=link, expires_at=self._when(c.get("expires_at")), reason=c.get("reason", ""))
        elif d.kind == "password_changed":
            ctx.update(changed_at=self._when(c.get("changed_at")), how=HOW.get(c.get("cause", ""), "by you"),
                       signed_out=bool(c.get("signed_out")))
        elif d.kind in ("two_factor_enabled", "two_factor_disabled", "recovery_code_used"):
            ctx.update(when=self._when(c.get("when")), by=c.get("by", "user"), reason=c.get("reason", ""),
                       codes_left=int(c.get("codes_left", 0)))
        else:
            ctx.update(device=c.get("device", "A device"), when=self._when(c.get("when")))
        return ctx

    def render(self, d: store.Delivery, email: str, username: str) -> Rendered:
        ctx = self.context(d, email, username)
        subject = self.text_env.get_template(f"{d.kind}.subject.txt").render(ctx).strip()
        text = self.text_env.get_template(f"{d.kind}.txt").render(ctx)
        html = self.env.get_template(f"{d.kind}.html").render({**ctx, "subject": subject})
        return Rendered(email, subject, text, html)


def _with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + urlencode(params)
