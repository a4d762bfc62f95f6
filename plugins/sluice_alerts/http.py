"""POSTing a channel's JSON, and what a failure means: 5xx, 429, timeouts and unreachable
hosts may pass on a later try (``retry``); any other answer means the request is wrong.

A failure names the receiver's host only: a Slack webhook's path is its credential, and a
generic webhook's may hold a token too."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import trio

from sluice_core.alerting.model import MASK, SEND_TIMEOUT_S, DeliveryFailed

# httpx logs each request's whole URL at INFO, and a Slack webhook's URL is its secret.
logging.getLogger("httpx").setLevel(logging.WARNING)

_SHOWN_BODY = 200  # characters of a refusing receiver's answer kept in the failure


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret masked: what a server or a library says may echo one."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


async def post_json(
    url: str,
    body: Mapping[str, Any] | bytes,
    *,
    headers: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
) -> str:
    """POST ``body`` (a JSON object, or its bytes already encoded) to ``url``; the receipt
    ("HTTP 200"), or :class:`DeliveryFailed`. ``secrets``: values (besides the URL) that
    must not appear in the failure."""
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    host = urlsplit(url).hostname
    hidden = [url, *secrets]
    try:
        with trio.fail_after(SEND_TIMEOUT_S):
            async with httpx.AsyncClient(timeout=SEND_TIMEOUT_S) as client:
                response = await client.post(
                    url,
                    content=content,
                    headers={"content-type": "application/json", **(headers or {})},
                )
    except trio.TooSlowError:
        raise DeliveryFailed(f"no answer from {host} in {SEND_TIMEOUT_S:g} s", retry=True) from None
    except httpx.HTTPError as exc:
        reason = scrub(str(exc), hidden) or type(exc).__name__
        raise DeliveryFailed(f"cannot reach {host}: {reason}", retry=True) from None
    status = response.status_code
    if 200 <= status < 300:
        return f"HTTP {status}"
    said = scrub(response.text[:_SHOWN_BODY].strip(), hidden)
    raise DeliveryFailed(
        f"HTTP {status} from {host}" + (f": {said}" if said else ""),
        retry=status >= 500 or status == 429,
    )
