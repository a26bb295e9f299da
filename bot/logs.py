"""Logging set-up with a filter that scrubs every configured secret from every record."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, SecretStr

from bot.settings import Settings, mask_url_credentials

# Telegram bot tokens and bearer keys look like this even when they are not in settings.
TOKEN_PATTERNS = (
    re.compile(r"(?<!\d)\d{6,12}:[A-Za-z0-9_-]{30,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
)


def secret_values(model: BaseModel) -> list[str]:
    found: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, SecretStr):
            raw = value.get_secret_value()
            if len(raw) >= 4:
                found.append(raw)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                collect(getattr(value, name))
        elif isinstance(value, dict):  # a plugin's ``dict[str, SecretStr]``, ``list[…]``
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                collect(item)

    collect(model)
    return found


class RedactingFilter(logging.Filter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted(set(secrets), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "**********")
        for pattern in TOKEN_PATTERNS:
            text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "**********", text)
        return mask_url_credentials(text) if "://" in text else text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, so the redacted copy is what handlers print.
            formatter = logging.Formatter()
            clean = clean + "\n" + self.redact(formatter.formatException(record.exc_info))
            record.exc_info = None
            record.exc_text = None
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time, as logging's last-resort handler does.

    A handler bound to the stderr of the moment keeps a closed stream once a caller swaps it
    (Click's test runner, an embedding program), and every later record becomes a
    "--- Logging error ---" traceback on the user's terminal. A stream set explicitly
    (``setStream``, ``.stream = …``) is kept.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # not StreamHandler's: that would pin today's stderr
        self._pinned: Any = None

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr if self._pinned is None else self._pinned

    @stream.setter
    def stream(self, value: Any) -> None:
        self._pinned = value


def configure_logging(settings: Settings) -> RedactingFilter:
    redactor = RedactingFilter(secret_values(settings))
    handler = CurrentStderrHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    handler.addFilter(redactor)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # httpx logs full request URLs at INFO, and Telegram puts the token in the URL path.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return redactor
