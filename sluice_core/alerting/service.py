"""Alerts: the :class:`~sluice_core.alerting.model.AlertService` the web uses
(``Application.alerts``), over storage and the registered channel types.

It runs on every process serving the API (a replica too): it only reads and writes the
database, and sends test notifications. Incidents move on the leader (evaluate.py)
and messages go out from there (outbox.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from sluice_core.alerting.model import (
    SEND_TIMEOUT_S,
    Channel,
    ChannelType,
    DeliveryFailed,
    Incident,
    IncidentDetail,
    IncidentState,
    Invalid,
    Message,
    NotFound,
    ReadOnly,
    Rule,
)
from sluice_core.alerting.rules import (
    channel_by_id,
    file_channels,
    file_rules,
    parse_channel,
    parse_rule,
)
from sluice_core.storage import Storage, TimelineEntry

log = logging.getLogger(__name__)


class Alerts:
    def __init__(
        self,
        storage: Storage,
        channel_types: Mapping[str, ChannelType],
        *,
        public_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._types = channel_types
        self.public_url = public_url
        self._clock = clock

    # -- channels -------------------------------------------------------------------

    def channel_types(self) -> list[str]:
        return sorted(self._types)

    def _shown(self, channel: Channel) -> Channel:
        """The channel with its type's secret keys, so that ``to_dict`` masks them."""
        kind = self._types.get(channel.type)
        return attrs.evolve(channel, secrets=tuple(kind.secrets) if kind else ())

    async def channels(self) -> list[Channel]:
        return [self._shown(channel) for channel in await self._storage.alert_channels()]

    async def add_channel(self, body: Mapping[str, Any]) -> Channel:
        name, type_, config = parse_channel(body, self._types)
        channel = await self._storage.add_alert_channel(name, type_, config, self._clock())
        log.info("alert channel %r (%s) added", channel.name, channel.type)  # no config: secrets
        return self._shown(channel)

    async def _channel(self, channel_id: int) -> Channel:
        for channel in await self._storage.alert_channels():
            if channel.id == channel_id:
                return self._shown(channel)
        raise NotFound(f"no channel {channel_id}")

    async def delete_channel(self, channel_id: int) -> None:
        channel = await self._channel(channel_id)
        if channel.from_file:
            raise ReadOnly(f"the channel {channel.name!r} is declared in the configuration file")
        if not await self._storage.delete_alert_channel(channel_id):
            raise NotFound(f"no channel {channel_id}")

    async def test_channel(self, channel_id: int) -> str:
        channel = await self._channel(channel_id)
        kind = self._types.get(channel.type)
        if kind is None:
            raise DeliveryFailed(f"no plugin provides the channel type {channel.type!r}",
                                 retry=False)
        now = self._clock()
        message = Message(
            "test",
            None,
            f"Test notification from Sluice to the channel {channel.name}",
            (("Sluice", self.public_url),) if self.public_url else (),
            id=f"sluice-test-{channel.id}-{int(now * 1000)}",
        )
        try:
            with trio.fail_after(SEND_TIMEOUT_S):
                return await kind.send(channel.config, message)
        except trio.TooSlowError:
            raise DeliveryFailed(f"no answer within {SEND_TIMEOUT_S:g} s", retry=True) from None

    # -- rules ----------------------------------------------------------------------

    async def rules(self) -> list[Rule]:
        return await self._storage.alert_rules()

    async def _rule(self, rule_id: int) -> Rule:
        for rule in await self._storage.alert_rules():
            if rule.id == rule_id:
                return rule
        raise NotFound(f"no rule {rule_id}")

    async def _channel_ids(self) -> set[int]:
        return {channel.id for channel in await self._storage.alert_channels()}

    async def add_rule(self, body: Mapping[str, Any]) -> Rule:
        rule = parse_rule(body, channel_by_id(await self._channel_ids()), now=self._clock())
        return await self._storage.save_alert_rule(rule)

    async def update_rule(self, rule_id: int, body: Mapping[str, Any]) -> Rule:
        old = await self._writable(rule_id)
        rule = parse_rule(
            body, channel_by_id(await self._channel_ids()), now=self._clock(), rule_id=rule_id
        )
        if "muted_until" not in body:  # a mute is set on its own (mute_rule): kept
            rule = attrs.evolve(rule, muted_until=old.muted_until)
        return await self._storage.save_alert_rule(attrs.evolve(rule, created_at=old.created_at))

    async def _writable(self, rule_id: int) -> Rule:
        rule = await self._rule(rule_id)
        if rule.from_file:
            raise ReadOnly(f"the rule {rule.name!r} is declared in the configuration file")
        return rule

    async def delete_rule(self, rule_id: int) -> None:
        await self._writable(rule_id)
        if not await self._storage.delete_alert_rule(rule_id):
            raise NotFound(f"no rule {rule_id}")

    async def mute_rule(self, rule_id: int, until: float | None) -> Rule:
        """Rules of the file can be muted too: a mute is an operator's, not the rule's."""
        rule = await self._rule(rule_id)
        return await self._storage.save_alert_rule(
            attrs.evolve(rule, muted_until=until, updated_at=self._clock())
        )

    async def load_file(
        self, alerts: Mapping[str, Any], environ: Mapping[str, str] = os.environ
    ) -> list[Rule]:
        """Make the channels and the rules of the file's ``[alerts]`` table the stored
        file channels and rules (a rule names its channels by name, the file's or the
        API's). Raises Invalid naming the place in the file."""
        channels = file_channels(alerts, self._types, environ)
        try:
            stored = await self._storage.replace_file_channels(channels, self._clock())
        except Invalid as exc:
            raise Invalid("alerts.channels", exc.message) from None
        for channel in stored:  # no config: it holds secrets
            log.info("alert channel %r (%s) from the configuration file", channel.name,
                     channel.type)
        names = {channel.name: channel.id for channel in await self._storage.alert_channels()}
        rules = file_rules(alerts, names, self._clock())
        return await self._storage.replace_file_rules(rules)

    # -- incidents ------------------------------------------------------------------

    async def incidents(self, state: IncidentState | None, limit: int) -> list[Incident]:
        return await self._storage.list_incidents(state, limit)

    async def incident(self, incident_id: int) -> IncidentDetail:
        found = await self._storage.get_incident(incident_id)
        if found is None:
            raise NotFound(f"no incident {incident_id}")
        timeline = await self._storage.incident_timeline(incident_id)
        return IncidentDetail(found, [entry.to_dict() for entry in timeline], found.job_ids)

    async def ack(self, incident_id: int, actor: str | None) -> Incident:
        """Acknowledged: someone is on it; a firing incident is not repeated any more."""
        entry = TimelineEntry(self._clock(), "acknowledged", f"by {actor or 'someone'}")
        return await self._marked(incident_id, entry, acked_by=actor)

    async def silence(self, incident_id: int, until: float, actor: str | None) -> Incident:
        now = self._clock()
        if until <= now:
            raise Invalid("until", "must be in the future")
        entry = TimelineEntry(
            now, "silenced", f"by {actor or 'someone'} for {until - now:.0f} s"
        )
        return await self._marked(incident_id, entry, silenced_until=until)

    async def _marked(
        self,
        incident_id: int,
        entry: TimelineEntry,
        *,
        acked_by: str | None = None,
        silenced_until: float | None = None,
    ) -> Incident:
        found = await self._storage.mark_incident(
            incident_id, entry, acked_by=acked_by, silenced_until=silenced_until
        )
        if found is None:
            raise NotFound(f"no incident {incident_id}")
        return found

