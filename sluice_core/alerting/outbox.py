"""Delivery: the outbox's rows sent through their channel types, a singleton duty of
the leader (docs/alerting.md).

The evaluator queues a row per channel in the same transaction as the incident's
change (``Storage.save_incident``); :class:`Outbox` sends the due ones. Each attempt is
recorded on the incident's timeline with its outcome. A failure the channel type says
may pass (``DeliveryFailed(retry=True)``: a timeout, a 5xx, a refused connection) is
tried again after 1 s, 2 s, 4 s ... at most :data:`BACKOFF_MAX_S` apart, until
:data:`MAX_ATTEMPTS` or :data:`GIVE_UP_AFTER_S`; one it says will not
(``retry=False``: a 4xx) is given up at once. A channel sends at most ``rate_limit``
messages per ``rate_window_s``: past that, what is due for it is held, and sent as ONE
summary (``Message(event="summary", incidents=[...])``) as soon as the window allows.
The window's count is read back from the outbox when a run starts (a restart, a new
leader): neither gives a channel one more window.

A channel's config holds its secrets: it goes to the channel type and nowhere else,
and no log line here carries it, nor the text of an exception a channel type did not
word itself (``DeliveryFailed`` messages are made to be shown).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import trio

from sluice_core.alerting.evaluate import message_from_body
from sluice_core.alerting.model import SEND_TIMEOUT_S, Channel, ChannelType, DeliveryFailed
from sluice_core.storage import Notification, Storage, TimelineEntry

log = logging.getLogger(__name__)

BACKOFF_FIRST_S: Final = 1.0
BACKOFF_MAX_S: Final = 300.0
MAX_ATTEMPTS: Final = 30
GIVE_UP_AFTER_S: Final = 86_400.0
RATE_LIMIT: Final = 10  # messages per channel per RATE_WINDOW_S
RATE_WINDOW_S: Final = 60.0
POLL_S: Final = 1.0  # due rows are looked for this often (and whenever woken)
CLAIM: Final = 500  # due rows read at once


def backoff(attempts: int) -> float:
    """Seconds before the next try, after ``attempts`` failed ones."""
    return float(min(BACKOFF_FIRST_S * 2 ** (attempts - 1), BACKOFF_MAX_S))


def message_id(notification: Notification) -> str:
    """Names a row's message to its receiver, the same on each retry of it."""
    return f"sluice-notification-{notification.id}"


class Outbox:
    def __init__(
        self,
        storage: Storage,
        channel_types: Mapping[str, ChannelType],
        *,
        clock: Callable[[], float] = time.time,
        poll_s: float = POLL_S,
        rate_limit: int = RATE_LIMIT,
        rate_window_s: float = RATE_WINDOW_S,
    ) -> None:
        self._storage = storage
        self._types = channel_types
        self._clock = clock
        self.poll_s = poll_s
        self.rate_limit = rate_limit
        self.rate_window_s = rate_window_s
        # Per channel, when its latest messages went: read from the outbox at a
        # channel's first delivery of a run, then kept here.
        self._sent: dict[int, deque[float]] = {}
        self._wake = trio.Event()

    def wake(self) -> None:
        """Rows were queued: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        self._sent = {}  # a new term: what was sent meanwhile (another leader) is stored
        while True:
            try:
                await self.deliver_due()
            except Exception as exc:  # the database may be away: try again next round
                log.warning("alerting: delivery round failed: %s", type(exc).__name__)
            with trio.move_on_after(self.poll_s):
                await self._wake.wait()
            self._wake = trio.Event()

    async def deliver_due(self) -> None:
        """Send what is due now; channels in parallel, each channel's rows in order."""
        due = await self._storage.due_notifications(self._clock(), CLAIM)
        if not due:
            return
        channels = {channel.id: channel for channel in await self._storage.alert_channels()}
        rows: defaultdict[int, list[Notification]] = defaultdict(list)
        for notification in due:
            rows[notification.channel_id].append(notification)
        async with trio.open_nursery() as nursery:
            for channel_id, held in rows.items():
                nursery.start_soon(self._deliver, channels.get(channel_id), held)

    async def _deliver(self, channel: Channel | None, rows: list[Notification]) -> None:
        if channel is None or channel.type not in self._types:
            why = "its channel was deleted" if channel is None else (
                f"no plugin provides the channel type {channel.type!r}"
            )
            for row in rows:
                await self._storage.notification_attempted(
                    row, TimelineEntry(self._clock(), "gave up", f"{row.event}: {why}")
                )
            return
        now = self._clock()
        sent = self._sent.get(channel.id)
        if sent is None:
            since = now - self.rate_window_s
            sent = deque(sorted(await self._storage.recent_deliveries(channel.id, since)))
            self._sent[channel.id] = sent
        while sent and sent[0] <= now - self.rate_window_s:
            sent.popleft()
        room = self.rate_limit - len(sent)
        if room <= 0:
            return  # held: due again at the next round, summarized when the window allows
        if len(rows) > room:
            rows = [await self._summarize(channel, rows, now)]
        for row in rows:
            await self._attempt(self._types[channel.type], channel, row)

    async def _summarize(
        self, channel: Channel, rows: Sequence[Notification], now: float
    ) -> Notification:
        """One summary row in place of ``rows`` (a summary among them is flattened)."""
        latest: dict[int, Mapping[str, Any]] = {}
        for row in rows:
            for incident in row.body.get("incidents") or [row.body.get("incident")]:
                if incident is not None:
                    latest[int(incident["id"])] = incident  # rows come oldest first
        incidents = list(latest.values())
        states: defaultdict[str, int] = defaultdict(int)
        for incident in incidents:
            states[incident["state"]] += 1
        counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        names = ", ".join(sorted({str(i["rule"]["name"]) for i in incidents}))
        text = (
            f"{len(rows)} notifications held back by {channel.name}'s rate limit"
            f" ({self.rate_limit} per {self.rate_window_s:g} s): {counts} ({names})"
        )
        body = {"event": "summary", "incident": None, "text": text, "links": [],
                "incidents": incidents}
        summary = Notification(None, channel.id, "summary", body, now, now)
        return await self._storage.merge_notifications(rows, summary, now)

    async def _attempt(self, kind: ChannelType, channel: Channel, row: Notification) -> None:
        message = message_from_body(row.body, message_id(row))
        self._sent[channel.id].append(self._clock())
        failure: DeliveryFailed | None = None
        receipt = ""
        try:
            with trio.fail_after(SEND_TIMEOUT_S):
                receipt = await kind.send(channel.config, message)
        except trio.TooSlowError:
            failure = DeliveryFailed(f"no answer within {SEND_TIMEOUT_S:g} s", retry=True)
        except DeliveryFailed as exc:
            failure = exc
        except Exception as exc:
            # Not worded by the channel type for showing: its text may hold a secret.
            failure = DeliveryFailed(
                f"unexpected {type(exc).__name__} in channel type {kind.name}", retry=True
            )
        now = self._clock()
        what = f"{row.event} to {channel.name}"
        if failure is None:
            await self._storage.notification_attempted(
                row, TimelineEntry(now, "delivered", f"{what}: {receipt}"), delivered=True
            )
            return
        attempts = row.attempts + 1
        retry_at = now + backoff(attempts)
        if (
            not failure.retry
            or attempts >= MAX_ATTEMPTS
            or retry_at - row.created_at > GIVE_UP_AFTER_S
        ):
            outcome, retry = "gave up", None
        else:
            outcome, retry = f"retry in {backoff(attempts):g} s", retry_at
        detail = f"{what}: {failure} (attempt {attempts}; {outcome})"
        log.warning("alerting: %s", detail)
        await self._storage.notification_attempted(
            row, TimelineEntry(now, "failed", detail), retry_at=retry
        )
