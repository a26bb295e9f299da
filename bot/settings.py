"""Every knob of oogiri, from env (OOGIRI_*, nested with __), a .env file or a TOML file.

Sections are grouped by concern so that a plugin reads only its own part. Secrets are SecretStr so
that printing settings (``oogiri config show``) or logging them never leaks a token.
"""

from __future__ import annotations

import json
import os
import re
import threading
from contextvars import ContextVar
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, cast, get_args, get_origin

from pydantic import BaseModel, Field, PrivateAttr, SecretStr, create_model, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from bot.ab_settings import AbSettings
from bot.moderation_settings import ModerationSettings
from bot.plugins import add_settings_section, make_manager, settings_sections

DEFAULT_PROMPT = "请你根据这张图片，讲一个脑洞大开的梗"


def split_list(value: Any) -> Any:
    """A list setting from the environment: ``a,b`` or JSON ``["a", "b"]`` (other values pass).

    OOGIRI_PLUGINS=web,telegram is friendlier than JSON; use it as a ``mode="before"`` validator
    on a field annotated with pydantic-settings' ``NoDecode``.
    """
    if isinstance(value, str):
        if value.strip().startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class PluginSettings(BaseModel):
    """Base of a settings section: a plugin's own model, registered with
    ``oogiri_register_settings`` and read from ``OOGIRI_<SECTION>__<FIELD>`` (or ``[section]`` in
    oogiri.toml). Use ``SecretStr`` for secrets: ``oogiri config show`` masks them."""


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "oogiri"


class EngineSettings(BaseModel):
    """Which engine answers and how it samples."""

    name: str = Field(default="transformers", description="registered engine name")
    model: Path | None = Field(
        default=None,
        description="local model folder; unset: the tiny demo model is built in data_dir",
    )
    model_version: str | None = Field(default=None, description="label stored with every joke")
    device: str = "cpu"
    threads: int = Field(
        default=0, description="torch threads for the local engine (0: torch's default)"
    )
    max_new_tokens: int = Field(default=64, ge=1, le=1024)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    max_dynamic_patch: int = Field(default=6, ge=1, le=40, description="InternVL tiles per image")
    timeout_s: float = Field(default=60.0, gt=0)
    # HTTP engines (lmdeploy / openai-compatible)
    base_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:23333"])
    api_key: SecretStr | None = None
    served_model_name: str | None = Field(
        default=None, description="unset: discovered from /v1/models"
    )
    retries: int = Field(default=2, ge=0, le=10)
    empty_answer_retries: int = Field(
        default=1,
        ge=0,
        le=5,
        description="ask again when the model's answer is empty (sampling differs)",
    )
    min_new_tokens: int = Field(
        default=1,
        ge=0,
        le=1024,
        description="lmdeploy: tokens before the end token is allowed (0: off); no blank jokes",
    )
    max_in_flight: int = Field(default=64, ge=1)
    breaker_failures: int = Field(
        default=5, ge=1, description="consecutive failures that open the breaker"
    )
    breaker_reset_s: float = Field(default=15.0, gt=0)
    presize_to_tiles: bool = Field(
        default=True, description="resize images to the tile grid before upload"
    )
    # HTTP engine details (bot/engines/openai_http.py)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    retry_backoff_s: float = Field(
        default=0.2,
        ge=0,
        description="first retry delay; doubles per retry, ±50% jitter, capped at 5 s",
    )
    request_extra: dict[str, Any] = Field(
        default_factory=dict,
        description="extra JSON fields for every chat request (e.g. ignore_eos for benchmarks)",
    )


class ImageSettings(BaseModel):
    """Limits applied to untrusted uploads before and during decoding."""

    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=40_000_000, ge=1, description="width*height before decoding")
    max_side: int = Field(default=2048, ge=64, description="longest side after normalisation")
    max_aspect: float = Field(default=20.0, ge=1.0, description="longest/shortest side")
    jpeg_quality: int = Field(default=92, ge=50, le=100)
    # Memory, not pixels, is what a decode costs: a 16-bit or float picture needs more per pixel.
    max_decoded_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024 * 1024,
        description="estimated memory to decode one picture",
    )
    decode_budget_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024 * 1024,
        description="estimated decode memory of all at once",
    )
    decode_wait_s: float = Field(
        default=30.0, ge=0, description="wait for decode memory before 'busy'"
    )


class LimitSettings(BaseModel):
    """Rate limits and the concurrency cap enforced by JokeService."""

    per_user_per_minute: int = Field(default=6, ge=0, description="0: unlimited")
    per_chat_per_minute: int = Field(default=30, ge=0, description="0: unlimited")
    max_concurrency: int = Field(default=4, ge=1, description="engine calls in flight per process")
    queue_timeout_s: float = Field(default=20.0, ge=0, description="wait for a slot before 'busy'")
    max_queue: int = Field(
        default=64, ge=0, description="waiting for a slot; more: busy now (0: no bound)"
    )
    backend: str = Field(
        default="memory", description="'memory', or a redis:// URL shared by replicas"
    )
    max_hint_chars: int = Field(default=200, ge=0)


class StoreSettings(BaseModel):
    url: str | None = Field(
        default=None, description="SQLAlchemy async URL; unset: SQLite in data_dir"
    )
    echo: bool = False


class Settings(BaseSettings):
    """The whole configuration. Precedence: init > env > .env > TOML file > defaults."""

    model_config = SettingsConfigDict(
        env_prefix="OOGIRI_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    # NoDecode: the env value is split by the validator below instead of parsed as JSON first.
    channels: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["web"])
    plugins: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="load only these plugins (entry-point names); unset: all"
    )
    prompt: str = DEFAULT_PROMPT
    language: Literal["zh", "en"] = "zh"
    log_level: str = "INFO"
    strict: bool = Field(
        default=False,
        description="an unknown OOGIRI_ key (env, .env, TOML) is an error, not a warning",
    )

    engine: EngineSettings = Field(default_factory=EngineSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    ab: AbSettings = Field(default_factory=AbSettings)
    moderation: ModerationSettings = Field(default_factory=ModerationSettings)

    _unknown: list[str] = PrivateAttr(default_factory=list)

    if TYPE_CHECKING:
        # Plugin sections (settings.web, settings.telegram, …) are fields of the class that
        # ``settings_class()`` builds at run time; a plugin reads its own section typed.
        def __getattr__(self, name: str) -> Any: ...

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # ``Settings()`` is the core plus every installed plugin's section.
        return super().__new__(cast(type[Self], settings_class()) if cls is Settings else cls)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._unknown = _pending_unknown.get() or []
        _pending_unknown.set(None)
        if self.strict and self._unknown:
            raise UnknownSettingsError(self._unknown)

    def unknown_keys(self) -> list[str]:
        """OOGIRI_ keys of env, .env and TOML that no setting reads (``where: KEY`` each)."""
        return list(self._unknown)

    @field_validator("channels", "plugins", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        return split_list(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file())
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            toml,
            file_secret_settings,
            _UnknownKeys(settings_cls, [env_settings, dotenv_settings, toml]),
        )

    @cached_property
    def database_url(self) -> str:
        if self.store.url:
            return self.store.url
        return f"sqlite+aiosqlite:///{self.data_dir / 'oogiri.sqlite3'}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    def masked(self) -> dict[str, Any]:
        """Effective settings as JSON-safe data with every secret replaced by '**********'.

        Besides fields typed as secrets, a password inside any URL-shaped value (store URL,
        Redis URL, engine base URLs, …) is masked too.
        """
        return _mask_url_values(self.model_dump(mode="json"))


# --------------------------------------------------------------------------- plugin sections
#
# A plugin contributes its own section through ``oogiri_register_settings(register)``:
# ``register("telegram", TelegramSettings)`` makes ``settings.telegram`` and OOGIRI_TELEGRAM__*.
# Registering a subclass of a core section's model adds fields to that section (the LMDeploy
# server plugin adds its ``engine.manage``, ``engine.tp``, … this way). ``Settings()`` builds its
# class from the core fields plus every section of the installed plugins (all entry points, found
# once per process) and of the plugins handed to ``make_manager``.

_discovery = threading.Lock()
_discovered = False

# OOGIRI_* variables that are not settings: the TOML file's path, the training venv's PYTHONPATH,
# test and benchmark switches (a trailing "_" is a prefix).
NOT_SETTINGS = (
    "config_file",
    "xtuner_pythonpath",
    "commit",
    "reliability_json",
    "learning_loop_control",
    "test_",
    "gpu_",
)


def _config_file() -> Path | None:
    """The TOML file to read, looked up at each ``Settings()``: ``OOGIRI_CONFIG_FILE`` (``~``
    expanded; empty or /dev/null: none), else ./oogiri.toml if there is one. A file the operator
    names must exist: a typo would otherwise leave the whole file silently unread."""
    named = os.environ.get("OOGIRI_CONFIG_FILE")
    if named is None:
        return Path("oogiri.toml")
    if named in ("", os.devnull):
        return None
    path = Path(named).expanduser()
    if not path.is_file():
        raise SettingsError(f"OOGIRI_CONFIG_FILE names {named} ({path.absolute()}), not a file")
    return path


class UnknownSettingsError(ValueError):
    """OOGIRI_ keys that no setting reads, refused in strict mode (``--strict``, OOGIRI_STRICT)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        super().__init__(
            "unknown settings (typo, or a plugin that is not installed?), refused in strict mode"
            " (--strict or OOGIRI_STRICT): " + ", ".join(keys)
        )


def register_section(section: str, model: type[BaseModel]) -> None:
    """Add (or extend) a section, as ``oogiri_register_settings``'s ``register`` callback does."""
    _check_core(section, model)
    add_settings_section(section, model)


def _check_core(section: str, model: type[BaseModel]) -> None:
    """A core section is extended by a subclass of its model, never replaced."""
    core = Settings.model_fields.get(section)
    if core is not None:
        base = core.annotation
        if not (isinstance(base, type) and issubclass(base, BaseModel)):
            raise ValueError(f"{section!r} is a core setting, not a section")
        if not issubclass(model, base):
            raise ValueError(
                f"settings section {section!r} belongs to the core: register a subclass of "
                f"{base.__name__} to add fields to it"
            )


def _discover() -> None:
    global _discovered
    with _discovery:
        if _discovered:
            return
        _discovered = True
        make_manager(None)  # every installed plugin, whatever OOGIRI_PLUGINS says


@lru_cache(maxsize=32)
def _build(sections: tuple[tuple[str, type[BaseModel]], ...]) -> type[Settings]:
    fields: dict[str, Any] = {
        name: (model, Field(default_factory=model)) for name, model in sections
    }
    cls = create_model("Settings", __base__=Settings, __module__=__name__, **fields)
    cls.__doc__ = Settings.__doc__
    return cls


def settings_class() -> type[Settings]:
    """The settings class of this process: the core's fields plus every plugin section."""
    _discover()
    sections = settings_sections()
    for name, model in sections.items():
        _check_core(name, model)
    return _build(tuple(sorted(sections.items())))


def _field_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model behind a field's annotation (``Model`` or ``Model | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _unknown_path(model: type[BaseModel], parts: list[str]) -> bool:
    field = model.model_fields.get(parts[0])
    if field is None:
        return True
    if len(parts) == 1:
        return False
    nested = _field_model(field.annotation)
    if nested is not None:
        return _unknown_path(nested, parts[1:])
    # a dict (or free-form) field takes any key below it; a plain value has nothing below it
    origin = get_origin(field.annotation) or field.annotation
    return not (origin is dict or field.annotation is Any)


def _unknown_in_toml(model: type[BaseModel], data: dict[str, Any], where: str) -> list[str]:
    out = []
    for key, value in data.items():
        if _unknown_path(model, [key]):
            out.append(f"{where}{key}")
            continue
        nested = _field_model(model.model_fields[key].annotation)
        if nested is not None and isinstance(value, dict):
            out += _unknown_in_toml(nested, value, f"{where}{key}.")
    return out


def _setting_name(loc: tuple[Any, ...]) -> str:
    """``OOGIRI_ENGINE__MAX_NEW_TOKENS (engine.max_new_tokens)`` for an error's location."""
    model: type[BaseModel] | None = settings_class()
    parts: list[str] = []
    for part in loc:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        if field is None:
            break
        parts.append(part)
        model = _field_model(field.annotation)
    if not parts:
        return "settings"
    return f"OOGIRI_{'__'.join(parts).upper()} ({'.'.join(parts)})"


def _decoded_as_json(name: str) -> bool:
    """Whether pydantic-settings reads the variable ``name`` as JSON (a list, table or model)."""
    model: type[BaseModel] | None = settings_class()
    field = None
    for part in name.lower().removeprefix("oogiri_").split("__"):
        field = model.model_fields.get(part) if model else None
        if field is None:
            return False
        model = _field_model(field.annotation)
    if field is None or any(isinstance(m, NoDecode) or m is NoDecode for m in field.metadata):
        return False
    kinds = (field.annotation, *get_args(field.annotation))
    return any(
        (get_origin(k) or k) in (list, dict, set, tuple, frozenset)
        or (isinstance(k, type) and issubclass(k, BaseModel))
        for k in kinds
    )


def _not_json(value: str | None) -> bool:
    try:
        json.loads(value or "")
    except ValueError:
        return True
    return False


def settings_error_message(exc: BaseException) -> str:
    """What is wrong with the settings, by the names an operator writes: the OOGIRI_ variable
    (and the TOML key) of each invalid value, and why; never the value (it may be a secret)."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    if isinstance(exc, ValidationError):
        for error in exc.errors(include_url=False, include_input=False):
            # strict mode refuses while the settings are read: the same words as --strict's
            if isinstance(unknown := error.get("ctx", {}).get("error"), UnknownSettingsError):
                return str(unknown)
        lines = [
            f"  {_setting_name(tuple(error['loc']))}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        ]
        return "invalid settings:\n" + "\n".join(lines)
    found = re.search(r'field "(\w+)" from source "(\w+)"', str(exc))
    if isinstance(exc, SettingsError) and found is not None:
        field, source = found.groups()
        if source == "DotEnvSettingsSource":
            from dotenv import dotenv_values

            where, values = ".env", dotenv_values(".env")
        else:
            where, values = "the environment", dict(os.environ)
        prefix = f"OOGIRI_{field}".upper()
        named = [n for n in values if n.upper() == prefix or n.upper().startswith(prefix + "__")]
        culprits = [n for n in named if _decoded_as_json(n) and _not_json(values[n])]
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        return (
            f"{', '.join(sorted(culprits or named)) or prefix} (from {where}): not valid JSON"
            f"{cause}; a list or table setting is written as JSON, e.g. [1, 2] or "
            '{"key": "value"}'
        )
    return str(exc)


_pending_unknown: ContextVar[list[str] | None] = ContextVar("oogiri_unknown", default=None)


class _UnknownKeys(PydanticBaseSettingsSource):
    """Not a source of values: notes every OOGIRI_ key of env, .env and TOML no setting reads."""

    def __init__(
        self, settings_cls: type[BaseSettings], sources: list[PydanticBaseSettingsSource]
    ) -> None:
        super().__init__(settings_cls)
        self.sources = sources

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        prefix = str(self.config.get("env_prefix") or "").lower()
        delimiter = str(self.config.get("env_nested_delimiter") or "__")
        unknown: list[str] = []
        for source in self.sources:
            if isinstance(source, TomlConfigSettingsSource):
                unknown += [
                    f"{source.toml_file_path}: {key}"
                    for key in _unknown_in_toml(self.settings_cls, source.toml_data, "")
                ]
                continue
            origin = "env" if type(source) is EnvSettingsSource else ".env"
            for name in getattr(source, "env_vars", {}):
                lowered = name.lower()
                if not lowered.startswith(prefix):
                    continue
                rest = lowered[len(prefix) :]
                if any(rest == n or (n.endswith("_") and rest.startswith(n)) for n in NOT_SETTINGS):
                    continue
                if _unknown_path(self.settings_cls, rest.split(delimiter)):
                    unknown.append(f"{origin}: {name.upper()}")
        _pending_unknown.set(sorted(set(unknown)))
        return {}


#: Where a URL starts, and where the word it is part of ends (white space, quotes, brackets).
_URL_START = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://")
_URL_END = re.compile(r"[\s\"'<>]")


def _credentials_end(rest: str) -> int | None:
    """Where the ``user:password@`` of a URL (``rest``: what follows ``scheme://``) ends: the
    index of its ``@``, or None when it has none.

    Parsers disagree on passwords that are not percent-encoded: urlsplit (redis-py, httpx) takes
    the *last* ``@`` before the first ``/``, ``?`` or ``#`` (``p@ss``), SQLAlchemy the first ``@``
    after ``user:`` even across a ``/`` (``ab/cd``). Both readings are masked.
    """
    host_end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    at = rest.rfind("@", 0, host_end)
    if at != -1:
        return at
    _user, colon, after = rest[:host_end].partition(":")
    if colon and not rest.startswith("[") and not after.isdigit():  # not a port: a password
        at = rest.find("@", host_end)
        next_url = _URL_START.search(rest, host_end)
        if at != -1 and (next_url is None or at < next_url.start()):
            return at
    return None


def mask_url_credentials(text: str) -> str:
    """Replace the password of every URL in ``text`` with '**********' (user names stay).

    A lone ``user@`` counts as a credential only with a password; ``scheme://token@host`` (as
    Redis and some APIs take it) is masked whole.
    """
    out: list[str] = []
    pos = 0
    while (start := _URL_START.search(text, pos)) is not None:
        begin = start.end()
        end = _URL_END.search(text, begin)
        rest = text[begin : end.start() if end else len(text)]
        at = _credentials_end(rest)
        out.append(text[pos:begin])
        pos = begin
        if at is not None:
            user, colon, _password = rest[:at].partition(":")
            out.append(f"{user}:**********@" if colon else "**********@")
            pos = begin + at + 1
    out.append(text[pos:])
    return "".join(out)


def _mask_url_values(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url_credentials(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: _mask_url_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_url_values(v) for v in value]
    return value


def mask_url(url: str) -> str:
    """Hide the password in a database URL before it reaches a log line."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable url>"
