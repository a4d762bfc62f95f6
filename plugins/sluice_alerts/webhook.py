"""The generic webhook: the message's JSON body, signed as the Standard Webhooks
specification says (https://www.standardwebhooks.com/), so a receiver can check it came
from this Sluice with any of that specification's libraries."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from standardwebhooks import Webhook

from sluice_alerts import settings
from sluice_alerts.http import post_json
from sluice_core.alerting.model import Invalid, Message

_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    """The HMAC key: a ``whsec_<base64>`` secret's decoded bytes (the specification's
    form), any other secret's UTF-8 bytes (a password a person chose)."""
    if not secret.startswith(_PREFIX):
        return secret.encode()
    encoded = secret.removeprefix(_PREFIX)
    try:
        # Padding is often left out of these secrets.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        key = b""
    if not key:
        raise Invalid("config.secret", f"after {_PREFIX}, the key must be non-empty base64")
    return key


class WebhookChannel:
    name: str = "webhook"
    secrets: tuple[str, ...] = ("secret",)

    def check(self, config: Mapping[str, Any]) -> dict[str, Any]:
        config = settings.mapping(config, ("url", "secret"))
        checked = {
            "url": settings.http_url(config, "url"),
            "secret": settings.text(config, "secret"),
        }
        signing_key(checked["secret"])
        return checked

    async def send(self, config: Mapping[str, Any], message: Message) -> str:
        body = orjson.dumps(message.body())
        # The attempt's own time: receivers refuse a signature older than a few minutes,
        # and the id (the same on each retry) is what they deduplicate by.
        now = datetime.fromtimestamp(int(time.time()), UTC)
        signature = Webhook(signing_key(config["secret"])).sign(message.id, now, body)
        headers = {
            "webhook-id": message.id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        return await post_json(config["url"], body, headers=headers, secrets=[config["secret"]])
