"""The built-in alert channels: a signed webhook, Slack, PagerDuty and email.

A plugin like any other (hook ``sluice_alert_channels``, :mod:`sluice_alerts.plugin`),
registered by default. Each channel type checks its config and sends one
:class:`~sluice_core.alerting.model.Message`; retrying, grouping and rate limits are the
outbox's. A failure says whether trying again may help, and never carries a secret.
"""
