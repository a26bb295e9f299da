"""Settings sources, rate limiters (memory and real Redis) and secret redaction in logs."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.limits import MemoryLimiter, RedisLimiter, make_limiter
from bot.logs import RedactingFilter, configure_logging, secret_values
from bot.settings import Settings, mask_url

REDIS_URL = os.environ.get("OOGIRI_TEST_REDIS", "redis://127.0.0.1:6379/15")


def test_env_nested_and_csv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OOGIRI_ENGINE__MAX_DYNAMIC_PATCH", "3")
    monkeypatch.setenv("OOGIRI_PLUGINS", "web, telegram")
    monkeypatch.setenv("OOGIRI_CHANNELS", "web,telegram")
    monkeypatch.setenv("OOGIRI_TELEGRAM__TOKEN", "123456:secret-token-value")
    s = Settings(_env_file=None, data_dir=tmp_path)
    assert s.engine.max_dynamic_patch == 3
    assert s.plugins == ["web", "telegram"] and s.channels == ["web", "telegram"]
    monkeypatch.setenv("OOGIRI_CHANNELS", '["discord"]')  # JSON lists work too
    assert Settings(_env_file=None, data_dir=tmp_path).channels == ["discord"]
    assert s.telegram.token is not None
    assert s.telegram.token.get_secret_value() == "123456:secret-token-value"
    assert "secret-token-value" not in repr(s)
    assert s.database_url == f"sqlite+aiosqlite:///{tmp_path / 'oogiri.sqlite3'}"


def test_dotenv_and_toml_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "oogiri.toml").write_text(
        'prompt = "from toml"\nlanguage = "en"\n[engine]\nmax_new_tokens = 7\n', encoding="utf-8"
    )
    (tmp_path / ".env").write_text("OOGIRI_PROMPT=from dotenv\n", encoding="utf-8")
    s = Settings()
    assert s.prompt == "from dotenv"  # .env beats the TOML file
    assert s.language == "en" and s.engine.max_new_tokens == 7
    monkeypatch.setenv("OOGIRI_PROMPT", "from env")
    assert Settings().prompt == "from env"


def test_invalid_values_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_dynamic_patch"):
        Settings(_env_file=None, data_dir=tmp_path, engine={"max_dynamic_patch": 0})


def test_config_show_masks_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bot.cli import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OOGIRI_DISCORD__TOKEN", "discord-super-secret")
    monkeypatch.setenv("OOGIRI_ENGINE__API_KEY", "sk-very-secret")
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["discord"]["token"] == "**********"
    assert "super-secret" not in result.output and "sk-very-secret" not in result.output


def test_mask_url_hides_password() -> None:
    assert "hunter2" not in mask_url("postgresql+asyncpg://bob:hunter2@db/oogiri")


async def test_memory_limiter_sliding_window() -> None:
    now = [0.0]
    lim = MemoryLimiter(clock=lambda: now[0])
    assert await lim.hit("k", 2, 60) is None
    assert await lim.hit("k", 2, 60) is None
    assert await lim.hit("k", 2, 60) == pytest.approx(60)
    now[0] = 30
    assert await lim.hit("k", 2, 60) == pytest.approx(30)
    now[0] = 60.5
    assert await lim.hit("k", 2, 60) is None
    assert await lim.hit("other", 2, 60) is None
    assert await lim.hit("k", 0, 60) is None  # 0 = unlimited


async def test_redis_limiter_is_shared_between_instances() -> None:
    import redis.asyncio as redis

    probe = redis.Redis.from_url(REDIS_URL)
    try:
        await probe.ping()
    except Exception:
        if os.environ.get("CI"):
            pytest.fail("Redis on 127.0.0.1:6379 is required in CI")
        pytest.skip("no Redis on 127.0.0.1:6379")
    finally:
        await probe.aclose()
    key = f"test-{uuid.uuid4().hex}"
    a, b = RedisLimiter(REDIS_URL), RedisLimiter(REDIS_URL)  # two replicas
    try:
        results = [await lim.hit(key, 3, 60) for lim in (a, b, a, b)]
        assert results[:3] == [None, None, None]
        assert results[3] is not None and 0 < results[3] <= 60
    finally:
        await a.close()
        await b.close()


def test_make_limiter_rejects_unknown_backend() -> None:
    assert isinstance(make_limiter("memory"), MemoryLimiter)
    with pytest.raises(ValueError, match=r"limits\.backend"):
        make_limiter("memcached://x")


def test_secrets_never_reach_logs(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    s = Settings(
        _env_file=None,
        data_dir=tmp_path,
        telegram={"token": "987654321:AAHsecretsecretsecretsecretsecret12"},
        engine={"api_key": "sk-local-abcdef"},
        web={"cookie_secret": "cookie-secret-123"},
    )
    assert set(secret_values(s)) == {
        "987654321:AAHsecretsecretsecretsecretsecret12",
        "sk-local-abcdef",
        "cookie-secret-123",
    }
    configure_logging(s)
    log = logging.getLogger("oogiri.test")
    log.warning("calling https://api.telegram.org/bot%s/getMe", s.telegram.token.get_secret_value())
    log.warning("key=%s cookie=%s", "sk-local-abcdef", "cookie-secret-123")
    try:
        raise RuntimeError("failed with Authorization: Bearer sk-local-abcdef")
    except RuntimeError:
        log.exception("engine call failed")
    err = capfd.readouterr().err
    for secret in secret_values(s):
        assert secret not in err
    assert err.count("**********") >= 4 and "engine call failed" in err


def test_unknown_token_shapes_are_redacted() -> None:
    f = RedactingFilter()
    assert "AAH" not in f.redact("bot123456789:AAHxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx/getMe")
    assert "abcdefgh123" not in f.redact("Authorization: Bearer abcdefgh123")


def test_logs_follow_a_swapped_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that swaps and closes stderr (Click's runner) must not break later log lines."""
    import io
    import sys

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        configure_logging(Settings(data_dir=tmp_path, _env_file=None))
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("oogiri.test").warning("after the swap")
        written = second.getvalue()
        assert "after the swap" in written and "Logging error" not in written, written
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
