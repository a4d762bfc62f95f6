"""Slack, through an incoming webhook: a Block Kit message (title, the facts, a button per
link) with a plain ``text`` for notifications and old clients. The webhook's URL is the
credential (https://api.slack.com/messaging/webhooks), so it is a secret."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sluice_alerts import settings, words
from sluice_alerts.http import post_json
from sluice_core.alerting.model import Message

# Block Kit's limits: a header's text, a section's and a field's, a button's label,
# fields per section, elements per actions block.
_HEADER, _SECTION, _FIELD, _BUTTON, _FIELDS, _BUTTONS = 150, 3000, 2000, 75, 10, 25

_EMOJI = {
    "incident.firing": ":rotating_light:",
    "incident.resolved": ":white_check_mark:",
    "summary": ":bell:",
    "test": ":wave:",
}


def _escape(text: str) -> str:
    # Slack's mrkdwn reads <...> as links and mentions, & as an entity.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def blocks(message: Message) -> dict[str, Any]:
    """The incoming webhook's payload for ``message``."""
    title = words.title(message)
    emoji = _EMOJI.get(message.event, ":bell:")
    out: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {
                "type": "plain_text",
                "text": _cut(f"{emoji} {title}", _HEADER),
                "emoji": True,
            },
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _cut(_escape(message.text), _SECTION)},
        },
    ]
    facts = [
        {"type": "mrkdwn", "text": _cut(f"*{label}*\n{_escape(value)}", _FIELD)}
        for label, value in words.facts(message)
    ]
    if facts:
        out.append({"type": "section", "fields": facts[:_FIELDS]})
    if message.links:
        buttons = [
            {
                "type": "button",
                "text": {"type": "plain_text", "text": _cut(label, _BUTTON)},
                "url": url,
            }
            for label, url in message.links[:_BUTTONS]
        ]
        out.append({"type": "actions", "elements": buttons})
    return {"text": _escape(f"{title}: {message.text}"), "blocks": out}


class SlackChannel:
    name: str = "slack"
    secrets: tuple[str, ...] = ("webhook_url",)

    def check(self, config: Mapping[str, Any]) -> dict[str, Any]:
        config = settings.mapping(config, ("webhook_url",))
        return {"webhook_url": settings.http_url(config, "webhook_url", secret=True)}

    async def send(self, config: Mapping[str, Any], message: Message) -> str:
        return await post_json(config["webhook_url"], blocks(message))
