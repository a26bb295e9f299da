"""Plugins own their settings sections; unknown OOGIRI_ keys are reported, never dropped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import BaseModel
import typer
from typer.testing import CliRunner

from bot.engines.lmdeploy_server import LMDeployEngineSettings
from bot.cli import check_unknown_settings
from bot.settings import DEFAULT_PROMPT, EngineSettings, Settings, register_section
from oogiri import PluginSettings
from plugins.discord_bot import DiscordSettings
from plugins.telegram import TelegramSettings
from plugins.web.settings import WebSettings
from training.settings import TrainingSettings


def fresh(tmp_path: Path, **kw) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, **kw)


def test_built_in_plugins_contribute_their_sections_with_the_old_env_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OOGIRI_TELEGRAM__TOKEN", "123:abc")
    monkeypatch.setenv("OOGIRI_TELEGRAM__ADMIN_IDS", "[1, 2]")
    monkeypatch.setenv("OOGIRI_DISCORD__DEV_GUILD_ID", "42")
    monkeypatch.setenv("OOGIRI_WEB__PORT", "8123")
    monkeypatch.setenv("OOGIRI_TRAINING__MIN_VOTES", "3")
    monkeypatch.setenv("OOGIRI_ENGINE__MANAGE", "true")
    monkeypatch.setenv("OOGIRI_ENGINE__TP", "2")
    monkeypatch.setenv("OOGIRI_ENGINE__NAME", "lmdeploy")
    s = fresh(tmp_path)
    assert isinstance(s.telegram, TelegramSettings) and s.telegram.admin_ids == [1, 2]
    assert s.telegram.token is not None and s.telegram.token.get_secret_value() == "123:abc"
    assert isinstance(s.discord, DiscordSettings) and s.discord.dev_guild_id == 42
    assert isinstance(s.web, WebSettings) and s.web.port == 8123
    assert isinstance(s.training, TrainingSettings) and s.training.min_votes == 3
    # the LMDeploy server plugin extends the core's engine section in place
    assert isinstance(s.engine, LMDeployEngineSettings) and isinstance(s.engine, EngineSettings)
    assert (s.engine.name, s.engine.manage, s.engine.tp) == ("lmdeploy", True, 2)
    assert isinstance(s, Settings) and s.unknown_keys() == []
    shown = s.masked()
    assert shown["telegram"]["token"] == "**********" and "123:abc" not in json.dumps(shown)
    assert shown["engine"]["tp"] == 2 and shown["training"]["min_votes"] == 3


def test_the_core_declares_no_plugin_settings() -> None:
    core = set(Settings.model_fields)
    assert not {"web", "telegram", "discord", "training"} & core
    assert not {"manage", "tp", "session_len", "server_command"} & set(EngineSettings.model_fields)


def test_toml_sections_of_plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = tmp_path / "oogiri.toml"
    toml.write_text(
        '[telegram]\nmode = "webhook"\n[engine]\nsession_len = 4096\n[web]\nprot = 1\n'
        "[nosuchplugin]\nx = 1\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # oogiri.toml is read from the working directory
    s = fresh(tmp_path)
    assert s.telegram.mode == "webhook" and s.engine.session_len == 4096
    assert s.unknown_keys() == ["oogiri.toml: nosuchplugin", "oogiri.toml: web.prot"]


def test_unknown_keys_are_reported_from_env_and_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "OOGIRI_TELEGRAM__TOKN=x\nOTHER=1\nOOGIRI_PROMPT=讲个笑话\n", encoding="utf-8"
    )
    monkeypatch.setenv("OOGIRI_PROMTP", "value-xyz")
    monkeypatch.setenv("OOGIRI_ENGINE__REQUEST_EXTRA__IGNORE_EOS", "true")  # a dict takes any key
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("OOGIRI_CONFIG_FILE", str(tmp_path / "empty.toml"))  # not a setting
    monkeypatch.setenv("OOGIRI_TEST_MARKER", "1")
    s = Settings(_env_file=str(dotenv), data_dir=tmp_path)
    assert s.prompt == "讲个笑话"
    assert s.unknown_keys() == [
        ".env: OOGIRI_TELEGRAM__TOKN",
        "env: OOGIRI_PROMTP",
    ]
    check_unknown_settings(s, strict=False)
    warned = capsys.readouterr().err
    assert "OOGIRI_PROMTP" in warned and "value-xyz" not in warned  # never the value
    with pytest.raises(typer.Exit):
        check_unknown_settings(s, strict=True)
    refused = capsys.readouterr().err
    assert "OOGIRI_PROMTP" in refused and "refused in strict mode" in refused
    assert "warning" not in refused and "value-xyz" not in refused
    monkeypatch.setenv("OOGIRI_STRICT", "true")
    with pytest.raises(ValueError, match="OOGIRI_PROMTP"):
        Settings(_env_file=str(dotenv), data_dir=tmp_path)


def test_sections_are_checked_when_registered(plugin_sections: None) -> None:
    class Loose(BaseModel):
        x: int = 1

    class MoreEngine(EngineSettings):
        y: int = 2

    with pytest.raises(ValueError, match="belongs to the core"):
        register_section("engine", Loose)
    with pytest.raises(ValueError, match="core setting"):
        register_section("prompt", Loose)
    with pytest.raises(ValueError, match="lower-case"):
        register_section("Bad-Name", Loose)
    with pytest.raises(TypeError, match="not a pydantic model"):
        register_section("thing", dict)  # type: ignore[arg-type]
    register_section("thing", Loose)
    register_section("thing", Loose)  # the same model again is fine (a plugin loaded twice)

    class Other(PluginSettings):
        x: int = 1

    with pytest.raises(ValueError, match="registered twice"):
        register_section("thing", Other)
    with pytest.raises(ValueError, match="registered twice"):
        register_section("engine", MoreEngine)  # LMDeploy's subclass already holds it


def test_config_show_masks_secrets_and_strict_refuses_unknown_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bot.cli import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OOGIRI_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("OOGIRI_DISCORD__TOKEN", "discord-secret")
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["discord"]["token"] == "**********" and "discord-secret" not in result.output
    monkeypatch.setenv("OOGIRI_DISCORD__TOKNE", "x")
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 0 and "OOGIRI_DISCORD__TOKNE" in result.stderr
    result = CliRunner().invoke(cli, ["config", "show", "--strict"])
    assert result.exit_code == 2 and "OOGIRI_DISCORD__TOKNE" in result.output
    # OOGIRI_STRICT refuses while the settings are read, in the same words, not pydantic's
    monkeypatch.setenv("OOGIRI_STRICT", "true")
    for command in (["config", "show"], ["plugins"]):
        strict = CliRunner().invoke(cli, command)
        assert strict.exit_code == 2, strict.output
        said = " ".join(strict.stderr.split())
        assert "refused in strict mode" in said and "OOGIRI_DISCORD__TOKNE" in said, said
        assert "Value error" not in said
    flagged = " ".join(result.stderr.split())
    assert "refused in strict mode (--strict or OOGIRI_STRICT)" in flagged, flagged


def test_a_named_config_file_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A mistyped OOGIRI_CONFIG_FILE is an error, not a configuration silently left unread."""
    from bot.cli import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OOGIRI_DATA_DIR", str(tmp_path))
    (tmp_path / "mine.toml").write_text('prompt = "from mine"\n')
    monkeypatch.setenv("OOGIRI_CONFIG_FILE", "mine.toml")
    shown = CliRunner().invoke(cli, ["config", "show"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["prompt"] == "from mine"
    (tmp_path / "mine.toml").write_text('prompt = "from mine"\npromtp = "x"\n')
    shown = CliRunner().invoke(cli, ["config", "show"])
    assert "unknown setting mine.toml: promtp" in shown.stderr  # the file it read, named
    for missing in ("mnie.toml", str(tmp_path)):  # a typo, a folder
        monkeypatch.setenv("OOGIRI_CONFIG_FILE", missing)
        refused = CliRunner().invoke(cli, ["config", "show"])
        said = " ".join(refused.stderr.split())
        assert refused.exit_code == 2 and f"OOGIRI_CONFIG_FILE names {missing} (" in said, said
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("OOGIRI_CONFIG_FILE", "~/mine.toml")
    shown = CliRunner().invoke(cli, ["config", "show"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["prompt"] == "from mine"
    (tmp_path / "oogiri.toml").write_text('prompt = "from the working directory"\n')
    for none in ("", os.devnull):  # no file at all, not even ./oogiri.toml
        monkeypatch.setenv("OOGIRI_CONFIG_FILE", none)
        shown = CliRunner().invoke(cli, ["config", "show"])
        assert shown.exit_code == 0 and json.loads(shown.stdout)["prompt"] == DEFAULT_PROMPT
    monkeypatch.delenv("OOGIRI_CONFIG_FILE")
    shown = CliRunner().invoke(cli, ["config", "show"])
    assert json.loads(shown.stdout)["prompt"] == "from the working directory"
    (tmp_path / "oogiri.toml").unlink()  # the default file may be absent
    assert CliRunner().invoke(cli, ["config", "show"]).exit_code == 0


@pytest.fixture
def plugin_sections():
    """Sections registered by a test are forgotten after it."""
    import bot.plugins
    import bot.settings

    bot.settings.settings_class()  # the installed plugins' sections are found before the snapshot
    saved = bot.plugins.settings_sections()
    yield
    bot.plugins._settings_sections.clear()
    bot.plugins._settings_sections.update(saved)
