"""Registers the built-in channel types (a default plugin, sluice_core/plugins.py)."""

from __future__ import annotations

from collections.abc import Callable

from sluice_alerts.pagerduty import PagerDutyChannel
from sluice_alerts.slack import SlackChannel
from sluice_alerts.smtp import EmailChannel
from sluice_alerts.webhook import WebhookChannel
from sluice_core import hookimpl
from sluice_core.alerting.model import ChannelType
from sluice_core.config import Config


@hookimpl
def sluice_alert_channels(config: Config, register: Callable[[ChannelType], None]) -> None:
    for kind in (WebhookChannel(), SlackChannel(), PagerDutyChannel(), EmailChannel()):
        register(kind)
