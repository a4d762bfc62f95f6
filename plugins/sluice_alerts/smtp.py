"""Email over SMTP: a text and an HTML part, through STARTTLS or implicit TLS, with a login
when a username is given. smtplib blocks, so it runs in a worker thread, bounded by
SEND_TIMEOUT_S (each socket operation too, so an abandoned thread ends soon after)."""

from __future__ import annotations

import html
import smtplib
import ssl
from collections.abc import Mapping
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

import trio

from sluice_alerts import settings, words
from sluice_alerts.http import scrub
from sluice_core.alerting.model import SEND_TIMEOUT_S, DeliveryFailed, Invalid, Message

_KEYS = ("host", "port", "starttls", "tls", "username", "password", "from", "to")


def compose(config: Mapping[str, Any], message: Message) -> EmailMessage:
    """The email for ``message``: plain text first, the HTML alternative after it."""
    title = words.title(message)
    facts = words.facts(message)
    mail = EmailMessage()
    mail["Subject"] = f"[Sluice] {title}"
    mail["From"] = config["from"]
    mail["To"] = ", ".join(config["to"])
    mail["Date"] = formatdate(localtime=False)
    mail["Message-ID"] = make_msgid(domain=config["from"].rpartition("@")[2])
    text = [message.text, ""]
    text += [f"{label}: {value}" for label, value in facts]
    text += [""] + [f"{label}: {url}" for label, url in message.links]
    mail.set_content("\n".join(text) + "\n")
    esc = html.escape
    rows = "".join(
        f"<tr><th align='left' valign='top'>{esc(label)}</th>"
        f"<td style='white-space: pre-line'>{esc(value)}</td></tr>"
        for label, value in facts
    )
    links = " | ".join(f"<a href='{esc(url)}'>{esc(label)}</a>" for label, url in message.links)
    mail.add_alternative(
        f"<html><body><h2>{esc(title)}</h2><p>{esc(message.text)}</p>"
        f"<table>{rows}</table><p>{links}</p></body></html>",
        subtype="html",
    )
    return mail


def _deliver(config: Mapping[str, Any], mail: EmailMessage) -> str:
    # The system's trust store (or SSL_CERT_FILE): a relay's certificate is checked.
    context = ssl.create_default_context()
    host, port = config["host"], config["port"]
    smtp = (
        smtplib.SMTP_SSL(host, port, timeout=SEND_TIMEOUT_S, context=context)
        if config["tls"]
        else smtplib.SMTP(host, port, timeout=SEND_TIMEOUT_S)
    )
    with smtp:
        if config["starttls"]:
            smtp.starttls(context=context)
        if config.get("username"):
            smtp.login(config["username"], config["password"])
        refused = smtp.send_message(mail)
    accepted = len(config["to"]) - len(refused)
    return f"accepted by {host} for {accepted} of {len(config['to'])} recipients"


class EmailChannel:
    name: str = "email"
    secrets: tuple[str, ...] = ("password",)

    def check(self, config: Mapping[str, Any]) -> dict[str, Any]:
        config = settings.mapping(config, _KEYS)
        checked: dict[str, Any] = {
            "host": settings.text(config, "host"),
            "port": settings.port(config, "port"),
            "starttls": settings.flag(config, "starttls"),
            "tls": settings.flag(config, "tls"),
            "from": settings.address(config.get("from"), "config.from"),
        }
        if checked["starttls"] and checked["tls"]:
            raise Invalid("config.tls", "either tls (implicit, port 465) or starttls, not both")
        to = config.get("to")
        if not isinstance(to, list) or not to:
            raise Invalid("config.to", "required, a list of email addresses")
        checked["to"] = [settings.address(each, f"config.to.{n}") for n, each in enumerate(to)]
        username = settings.optional_text(config, "username")
        if username is not None:
            if not (checked["starttls"] or checked["tls"]):
                raise Invalid(
                    "config.starttls", "a password is sent over TLS only: set starttls or tls"
                )
            checked["username"] = username
            checked["password"] = settings.text(config, "password")
        return checked

    async def send(self, config: Mapping[str, Any], message: Message) -> str:
        mail = compose(config, message)
        host = config["host"]
        try:
            with trio.fail_after(SEND_TIMEOUT_S):
                return await trio.to_thread.run_sync(_deliver, config, mail, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise DeliveryFailed(
                f"no answer from {host} in {SEND_TIMEOUT_S:g} s", retry=True
            ) from None
        except smtplib.SMTPResponseException as exc:
            # 4xx: the server asks to come back later; 5xx: it refuses this (a bad login, an
            # unknown sender).
            said = exc.smtp_error
            if isinstance(said, bytes):
                said = said.decode(errors="replace")
            reason = scrub(f"{exc.smtp_code} {said}", [config.get("password", "")])
            raise DeliveryFailed(f"SMTP {host}: {reason}", retry=exc.smtp_code < 500) from None
        except smtplib.SMTPRecipientsRefused:
            raise DeliveryFailed(f"SMTP {host} refused every recipient", retry=False) from None
        except (smtplib.SMTPNotSupportedError, ssl.SSLCertVerificationError) as exc:
            # Not a passing trouble: STARTTLS or AUTH missing, a certificate not trusted.
            raise DeliveryFailed(f"SMTP {host}: {exc}", retry=False) from None
        except (OSError, smtplib.SMTPException) as exc:
            reason = scrub(str(exc), [config.get("password", "")]) or type(exc).__name__
            raise DeliveryFailed(f"cannot reach SMTP {host}: {reason}", retry=True) from None
