"""One test per hook (``test_hook_<name>``), plus the discipline that keeps it so.

Like datasette, a hook that has no documentation in docs/plugins.md or no test named after it
fails the suite: the plugin contract is only as good as its weakest documented hook.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot import hookspecs
from bot.app import App
from bot.engines.instant import InstantEngine
from bot.hookspecs import hookimpl
from bot.models import JokeRequest, Rejected
from bot.plugins import Registry, call_first, call_hook, collect, describe, make_manager, notify
from bot.settings import Settings
from plugins.web import hookspecs as web_hookspecs

ROOT = Path(__file__).resolve().parents[1]
# The core's hooks and those a built-in plugin declares itself (``oogiri_add_hookspecs``).
SPECS = {
    name: fn
    for module in (hookspecs, web_hookspecs)
    for name, fn in inspect.getmembers(module, inspect.isfunction)
    if name.startswith("oogiri_")
}
HOOKS = sorted(SPECS)
HISTORIC = {"oogiri_add_hookspecs"}  # pluggy allows no wrapper of a historic hook


def test_every_hook_is_documented() -> None:
    doc = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^### (oogiri_\w+)", doc, flags=re.M))
    assert set(HOOKS) - documented == set(), "document these hooks in docs/plugins.md"
    assert documented - set(HOOKS) == set(), "docs/plugins.md documents hooks that do not exist"
    for name in HOOKS:
        section = doc.split(f"### {name}", 1)[1].split("\n### ", 1)[0]
        assert "```python" in section, f"{name} needs an example in docs/plugins.md"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_signature_matches_the_docs(name: str) -> None:
    """Like datasette's meta-test: the documented call shows the spec's real arguments."""
    doc = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    section = doc.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
    documented = re.search(rf"`{name}\(([^)]*)\)", section)
    assert documented, f"docs/plugins.md: start the {name} section with `{name}(...)`"
    args = [a.strip() for a in documented.group(1).split(",") if a.strip()]
    assert args == list(inspect.signature(SPECS[name]).parameters)


def test_every_hook_has_a_test_of_its_own() -> None:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names |= {
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
    missing = [h for h in HOOKS if f"test_hook_{h.removeprefix('oogiri_')}" not in names]
    assert missing == [], f"write test_hook_<name> tests for: {missing}"


def req(data: bytes, **kw) -> JokeRequest:
    return JokeRequest(image_bytes=data, channel="test", user_id="test:u", **kw)


class Recorder:
    """A plugin that records the order in which the core calls it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def oogiri_before_joke(self, request: JokeRequest) -> None:
        assert request.image is not None  # the image was validated first
        self.calls.append("before")

    @hookimpl
    async def oogiri_prompt(self, request: JokeRequest, settings: Settings) -> str | None:
        self.calls.append("prompt")
        return None

    @hookimpl
    def oogiri_after_joke(self, request, joke) -> None:
        self.calls.append("after")


async def make_app(settings: Settings, *plugins: object, engine=None) -> App:
    pm = make_manager([], extra=plugins)
    return await App.create(settings, pm=pm, engine=engine or InstantEngine())


def test_hook_register_engines(settings: Settings) -> None:
    class P:
        @hookimpl
        def oogiri_register_engines(self, register, settings):
            register("custom", lambda s: InstantEngine(model="custom-1"))

    pm = make_manager([], extra=[P()])
    engines = collect(pm, "oogiri_register_engines", "engine", settings)
    assert engines.names() == ["custom"]
    assert engines.get("custom")(settings).model == "custom-1"
    with pytest.raises(LookupError, match="registered: custom"):
        engines.get("nope")


async def test_hook_register_engines_picks_engine_by_setting(settings: Settings) -> None:
    settings.engine.name = "instant"
    app = await App.create(settings, pm=make_manager(["engine_instant"]))
    try:
        assert app.engine.name == "instant"
    finally:
        await app.close()


async def test_hook_register_channels(settings: Settings) -> None:
    events: list[str] = []

    class Chan:
        name = "fake"

        def __init__(self, app: App) -> None:
            self.app = app

        async def start(self) -> None:
            events.append("start")

        async def stop(self) -> None:
            events.append("stop")

    class P:
        @hookimpl
        def oogiri_register_channels(self, register, settings):
            register("fake", Chan)

    app = await make_app(settings, P())
    assert app.channel_registry.names() == ["fake"]
    await app.start_channels(["fake"])
    await app.close()
    assert events == ["start", "stop"]


def test_registry_refuses_duplicates() -> None:
    r = Registry("channel")
    r.register("web", object)
    with pytest.raises(ValueError, match="twice"):
        r.register("web", object)


async def test_hook_prompt(settings: Settings, chelsea_png: bytes) -> None:
    class Sync:
        @hookimpl
        def oogiri_prompt(self, request, settings):
            return None  # declines: the next implementation answers

    class Async:
        @hookimpl
        async def oogiri_prompt(self, request, settings):
            return f"用{request.language}讲个笑话"

    app = await make_app(settings, Async(), Sync())
    try:
        joke = await app.service.tell(req(chelsea_png, language="en"))
        assert joke.prompt == "用en讲个笑话"
        assert await call_first(app.pm, "oogiri_prompt", request=req(b""), settings=settings)
    finally:
        await app.close()


async def test_hook_before_joke(settings: Settings, chelsea_png: bytes) -> None:
    class DenyList:
        @hookimpl
        async def oogiri_before_joke(self, request):
            if request.user_id == "test:banned":
                raise Rejected("You are not allowed here.")

    app = await make_app(settings, DenyList())
    try:
        with pytest.raises(Rejected) as info:
            await app.service.tell(JokeRequest(chelsea_png, channel="test", user_id="test:banned"))
        assert info.value.user_message("en") == "You are not allowed here."
        assert app.engine.calls == 0
        assert await app.store.request_outcomes() == {"rejected": 1}
        await app.service.tell(req(chelsea_png))
    finally:
        await app.close()


async def test_hook_after_joke(settings: Settings, chelsea_png: bytes) -> None:
    seen = []

    class Shout:
        @hookimpl
        def oogiri_after_joke(self, request, joke):
            seen.append(joke.text)
            return joke.text.upper() + "!"

    app = await make_app(settings, Shout())
    try:
        joke = await app.service.tell(req(chelsea_png))
        assert joke.text == seen[0].upper() + "!"
        assert (await app.store.get_joke(joke.id)).text == joke.text  # stored replaced text
    finally:
        await app.close()


async def test_hooks_called_in_documented_order(settings: Settings, chelsea_png: bytes) -> None:
    rec = Recorder()
    app = await make_app(settings, rec)
    try:
        await app.service.tell(req(chelsea_png))
        assert rec.calls == ["before", "prompt", "after"]
    finally:
        await app.close()


async def test_hook_on_rating(settings: Settings, chelsea_png: bytes) -> None:
    seen = []

    class Observer:
        @hookimpl
        async def oogiri_on_rating(self, rating):
            # Called after commit: the vote is already visible in the store.
            seen.append(
                (rating.value, rating.previous, await app.store.ratings_for(rating.joke_id))
            )

    class Broken:
        @hookimpl
        def oogiri_on_rating(self, rating):
            raise RuntimeError("observer bug")

    app = await make_app(settings, Observer(), Broken())
    try:
        joke = await app.service.tell(req(chelsea_png))
        await app.service.rate(joke.id, "test:v", 1, "test")
        await app.service.rate(joke.id, "test:v", -1, "test")
        assert seen == [(1, None, [("test:v", 1)]), (-1, 1, [("test:v", -1)])]
    finally:
        await app.close()


async def test_hook_startup(settings: Settings) -> None:
    started = []

    class P:
        @hookimpl
        async def oogiri_startup(self, app):
            started.append(app.store is not None and app.service is not None)

    app = await make_app(settings, P())
    await app.close()
    assert started == [True]


async def test_hook_shutdown(settings: Settings) -> None:
    order = []

    class P:
        @hookimpl
        def oogiri_shutdown(self, app):
            order.append("shutdown")

    class Engine(InstantEngine):
        async def close(self) -> None:
            order.append("engine closed")

    app = await make_app(settings, P(), engine=Engine())
    await app.close()
    assert order == ["shutdown", "engine closed"]


def test_hook_register_commands(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import typer

    import bot.cli

    class P:
        @hookimpl
        def oogiri_register_commands(self, cli: typer.Typer) -> None:
            @cli.command("hello")
            def hello(name: str) -> None:
                print(f"hello {name}")

    monkeypatch.setenv("OOGIRI_DATA_DIR", str(tmp_path))
    fresh = typer.Typer()
    for info in bot.cli.cli.registered_commands:
        fresh.registered_commands.append(info)
    pm = make_manager([], extra=[P()])
    pm.hook.oogiri_register_commands(cli=fresh)
    result = CliRunner().invoke(fresh, ["hello", "world"])
    assert result.exit_code == 0 and "hello world" in result.output


def test_plugins_filter_and_describe(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = make_manager(["engine_instant"])
    infos = describe(pm)
    assert [i.name for i in infos] == ["engine_instant"]
    assert infos[0].hooks == ("oogiri_register_engines",)
    everything = {i.name for i in describe(make_manager(None))}
    assert {"engine_instant", "engine_transformers", "web"} <= everything


def test_unknown_plugin_name_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    make_manager(["no-such-plugin"])
    assert "no-such-plugin" in caplog.text


async def test_hook_web_routes(settings: Settings) -> None:
    import httpx

    from plugins.web import create_api

    class P:
        @hookimpl
        def oogiri_web_routes(self, router, app):
            @router.get("/plugin/hello")
            async def hello() -> dict:
                return {"engine": app.engine.name}

    app = await make_app(settings, P())
    try:
        transport = httpx.ASGITransport(app=create_api(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/plugin/hello")
        assert response.status_code == 200 and response.json() == {"engine": "instant"}
    finally:
        await app.close()


async def test_hook_training_examples(settings: Settings) -> None:
    from training.export import apply_hooks

    def example(i: int, text: str) -> dict:
        return {"id": f"j{i}", "prompt": "讲个笑话", "text": text, "image_sha256": f"{i:064x}"}

    class DropLong:
        @hookimpl
        def oogiri_training_examples(self, examples):
            return [e for e in examples if len(e["text"]) <= 10]

    pm = make_manager([], extra=[DropLong()])
    kept = await apply_hooks(pm, [example(1, "short"), example(2, "far too long a joke")])
    assert [e["id"] for e in kept] == ["j1"]


async def test_hook_model_promoted(settings: Settings, tmp_path: Path) -> None:
    from bot.store import Store
    from training.run import CallablePromoter, promote_version

    seen: list[tuple[str, str | None]] = []
    swapped: list[str] = []

    class Notify:
        @hookimpl
        async def oogiri_model_promoted(self, version, previous):
            seen.append((version, previous))

    store = Store(settings.database_url, settings.images_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await store.upgrade()
    try:
        for v in ("m1", "m2"):
            (tmp_path / v).mkdir()
            await store.add_model_version(v, str(tmp_path / v))
        pm = make_manager([], extra=[Notify()])
        promoter = CallablePromoter(lambda version, path: swapped.append(version))
        await promote_version(store, pm, promoter, "m1")
        await promote_version(store, pm, promoter, "m2")
        assert seen == [("m1", None), ("m2", "m1")] and swapped == ["m1", "m2"]
    finally:
        await store.close()


# --- pluggy's calling rules hold for oogiri's hooks (wrappers, ordering, firstresult) ----------


class WrapEverything:
    """A ``wrapper=True`` implementation of every hook: it sees each call and passes results on."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def _wrap(self, name: str):
        self.seen.append(name)
        return (yield)

    @hookimpl(wrapper=True)
    def oogiri_register_channels(self, register, settings):
        return (yield from self._wrap("register_channels"))

    @hookimpl(wrapper=True)
    def oogiri_register_engines(self, register, settings):
        return (yield from self._wrap("register_engines"))

    @hookimpl(wrapper=True)
    def oogiri_register_commands(self, cli):
        return (yield from self._wrap("register_commands"))

    @hookimpl(wrapper=True)
    def oogiri_prompt(self, request, settings):
        return (yield from self._wrap("prompt"))

    @hookimpl(wrapper=True)
    def oogiri_register_settings(self, register):
        return (yield from self._wrap("register_settings"))

    @hookimpl(wrapper=True)
    def oogiri_admit(self, request):
        return (yield from self._wrap("admit"))

    @hookimpl(wrapper=True)
    def oogiri_before_joke(self, request):
        return (yield from self._wrap("before_joke"))

    @hookimpl(wrapper=True)
    def oogiri_after_joke(self, request, joke):
        return (yield from self._wrap("after_joke"))

    @hookimpl(wrapper=True)
    def oogiri_on_rating(self, rating):
        return (yield from self._wrap("on_rating"))

    @hookimpl(wrapper=True)
    def oogiri_training_examples(self, examples):
        return (yield from self._wrap("training_examples"))

    @hookimpl(wrapper=True)
    def oogiri_model_promoted(self, version, previous):
        return (yield from self._wrap("model_promoted"))

    @hookimpl(wrapper=True)
    def oogiri_startup(self, app):
        return (yield from self._wrap("startup"))

    @hookimpl(wrapper=True)
    def oogiri_shutdown(self, app):
        return (yield from self._wrap("shutdown"))

    @hookimpl(wrapper=True)
    def oogiri_web_routes(self, router, app):
        return (yield from self._wrap("web_routes"))


def test_the_wrapper_plugin_covers_every_hook() -> None:
    wrapped = {n for n in vars(WrapEverything) if n.startswith("oogiri_")}
    assert wrapped == set(HOOKS) - HISTORIC, "add a wrapper for the new hook to WrapEverything"


async def test_a_wrapper_of_every_hook_leaves_the_app_working(
    settings: Settings, chelsea_png: bytes
) -> None:
    """Every hook call goes through pluggy: a pass-through wrapper changes nothing it wraps."""
    import httpx
    import typer

    from plugins.web import create_api
    from training.export import apply_hooks

    wrap, rec = WrapEverything(), Recorder()
    seen_ratings: list[int] = []

    class Plain:
        @hookimpl
        async def oogiri_on_rating(self, rating):
            seen_ratings.append(rating.value)

        @hookimpl
        def oogiri_training_examples(self, examples):
            return examples[:1]

    settings.engine.name = "instant"
    pm = make_manager(["engine_instant", "web"], extra=[wrap, rec, Plain()])
    app = await App.create(settings, pm=pm)
    try:
        joke = await app.service.tell(req(chelsea_png))
        assert joke.prompt == settings.prompt and joke.text  # the async prompt declined
        await app.service.rate(joke.id, "test:v", 1, "test")
        assert seen_ratings == [1] and rec.calls == ["before", "prompt", "after"]
        pm.hook.oogiri_register_commands(cli=typer.Typer())
        ex = {"id": "a", "prompt": "p", "text": "t", "image_sha256": "0" * 64}
        assert [e["id"] for e in await apply_hooks(pm, [ex, {**ex, "id": "b"}])] == ["a"]
        await call_hook(pm, "oogiri_model_promoted", version="v2", previous="v1")
        transport = httpx.ASGITransport(app=create_api(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/healthz")).status_code == 200
    finally:
        await app.close()
    assert sorted(set(wrap.seen)) == sorted(
        h.removeprefix("oogiri_") for h in set(HOOKS) - HISTORIC
    )


async def test_a_wrapper_of_oogiri_prompt_gets_and_changes_the_answer(
    settings: Settings, chelsea_png: bytes
) -> None:
    """The reported bug: a ``wrapper=True`` prompt implementation made the prompt a generator."""

    class Answer:
        @hookimpl
        def oogiri_prompt(self, request, settings):
            return "讲个笑话"

    class Polite:
        @hookimpl(wrapper=True)
        def oogiri_prompt(self, request, settings):
            answer = yield
            return f"{answer}，谢谢"

    app = await make_app(settings, Answer(), Polite())
    try:
        joke = await app.service.tell(req(chelsea_png))
        assert joke.prompt == "讲个笑话，谢谢"
        assert await call_first(app.pm, "oogiri_prompt", request=req(b""), settings=settings) == (
            "讲个笑话，谢谢"
        )
    finally:
        await app.close()


async def test_an_old_style_hookwrapper_can_replace_the_prompt(
    settings: Settings, chelsea_png: bytes
) -> None:
    class Override:
        @hookimpl(hookwrapper=True)
        def oogiri_prompt(self, request, settings):
            outcome = yield
            if request.language == "en":
                outcome.force_result("Tell a joke.")

    app = await make_app(settings, Override())
    try:
        assert (await app.service.tell(req(chelsea_png, language="en"))).prompt == "Tell a joke."
        assert (await app.service.tell(req(chelsea_png))).prompt == settings.prompt
    finally:
        await app.close()


async def test_tryfirst_and_trylast_order_firstresult_and_async_answers_are_awaited(
    settings: Settings,
) -> None:
    class Late:
        @hookimpl(trylast=True)
        async def oogiri_prompt(self, request, settings):
            return "late"

    class Early:
        @hookimpl(tryfirst=True)
        async def oogiri_prompt(self, request, settings):
            return "early"

    class Declines:
        @hookimpl(tryfirst=True)
        def oogiri_prompt(self, request, settings):
            return None

    # registration order would put Late first; tryfirst/trylast decide instead
    pm = make_manager([], extra=[Early(), Late()])
    assert await call_first(pm, "oogiri_prompt", request=req(b""), settings=settings) == "early"
    pm = make_manager([], extra=[Late(), Declines()])
    assert await call_first(pm, "oogiri_prompt", request=req(b""), settings=settings) == "late"
    with pytest.raises(TypeError, match="not a firstresult hook"):
        await call_first(pm, "oogiri_on_rating", rating=None)


async def test_a_failing_observer_does_not_stop_the_others_and_wrappers_see_each(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    wrapped: list[str] = []

    class Watch:
        @hookimpl(wrapper=True)
        def oogiri_model_promoted(self, version, previous):
            try:
                return (yield)
            except RuntimeError as e:
                wrapped.append(f"error: {e}")
                raise

    class First:
        @hookimpl(tryfirst=True)
        def oogiri_model_promoted(self, version, previous):
            raise RuntimeError("first is broken")

    class Second:
        @hookimpl
        async def oogiri_model_promoted(self, version, previous):
            seen.append(version)

    class Third:
        @hookimpl(trylast=True)
        async def oogiri_model_promoted(self, version, previous):
            raise RuntimeError("third is broken too")

    pm = make_manager([], extra=[Watch(), First(), Second(), Third()])
    await notify(pm, "oogiri_model_promoted", version="v2", previous=None)
    assert seen == ["v2"]
    assert wrapped == ["error: first is broken"]  # the async failure surfaces after pluggy's call
    assert "first is broken" in caplog.text and "third is broken too" in caplog.text


async def test_an_unawaited_coroutine_is_closed_when_an_earlier_one_fails() -> None:
    import gc
    import warnings

    class Fails:
        @hookimpl(tryfirst=True)
        async def oogiri_startup(self, app):
            raise RuntimeError("boom")

    class Later:
        @hookimpl
        async def oogiri_startup(self, app):
            raise AssertionError("never runs")

    pm = make_manager([], extra=[Fails(), Later()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="boom"):
            await call_hook(pm, "oogiri_startup", app=None)
        gc.collect()  # an unclosed coroutine warns "never awaited" when it is collected
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


def test_the_public_api_names_what_plugins_need() -> None:
    """``from oogiri import …`` is the plugin author's import path; every name in it resolves."""
    import oogiri

    for name in oogiri.__all__:
        assert getattr(oogiri, name) is not None, name
    assert oogiri.hookimpl is hookimpl and oogiri.JokeRequest is JokeRequest
    assert oogiri.App is App
    with pytest.raises(AttributeError):
        _ = oogiri.no_such_name  # type: ignore[attr-defined]


async def test_hook_admit(settings: Settings, chelsea_png: bytes) -> None:
    class Blocklist:
        @hookimpl
        def oogiri_admit(self, request):
            assert request.image is None  # nothing downloaded or decoded yet
            if request.user_id == "test:blocked":
                raise Rejected("blocked")

    app = await make_app(settings, Blocklist())
    try:
        blocked = JokeRequest(chelsea_png, channel="test", user_id="test:blocked")
        with pytest.raises(Rejected):
            await app.service.admit(blocked)
        with pytest.raises(Rejected):  # tell() admits a request no channel admitted
            await app.service.tell(JokeRequest(chelsea_png, channel="test", user_id="test:blocked"))
        assert app.engine.calls == 0
        fine = req(chelsea_png)
        await app.service.admit(fine)
        assert fine.admitted and (await app.service.tell(fine)).text
    finally:
        await app.close()


def test_hook_register_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, plugin_sections: None
) -> None:
    from pydantic import Field, SecretStr

    from oogiri import PluginSettings

    class GreeterSettings(PluginSettings):
        word: str = "hello"
        times: int = Field(1, ge=1)
        token: SecretStr | None = None

    class Greeter:
        @hookimpl
        def oogiri_register_settings(self, register):
            register("greeter", GreeterSettings)

    make_manager([], extra=[Greeter()])
    monkeypatch.setenv("OOGIRI_GREETER__WORD", "你好")
    monkeypatch.setenv("OOGIRI_GREETER__TOKEN", "s3cret")
    s = Settings(_env_file=None, data_dir=tmp_path)
    assert isinstance(s.greeter, GreeterSettings)
    assert (s.greeter.word, s.greeter.times) == ("你好", 1)
    assert s.masked()["greeter"] == {"word": "你好", "times": 1, "token": "**********"}
    assert s.unknown_keys() == []
    monkeypatch.setenv("OOGIRI_GREETER__TIMES", "0")
    with pytest.raises(ValueError, match="times"):
        Settings(_env_file=None, data_dir=tmp_path)


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


def test_hook_add_hookspecs() -> None:
    """A plugin declares a hook of its own; another implements it; pluggy checks the signature."""
    import types

    from pluggy import PluginValidationError

    from oogiri import hookspec

    specs = types.ModuleType("greeter_hookspecs")

    @hookspec(firstresult=True)
    def oogiri_greeting(name: str) -> str | None:
        """The greeting for ``name``."""

    specs.oogiri_greeting = oogiri_greeting  # type: ignore[attr-defined]

    class Greeter:  # the plugin that owns the hook
        @hookimpl
        def oogiri_add_hookspecs(self, pm):
            pm.add_hookspecs(specs)

    class Polite:  # a plugin implementing it, registered first: checked once the spec arrives
        @hookimpl
        def oogiri_greeting(self, name):
            return f"ようこそ、{name}さん"

    pm = make_manager([], extra=[Polite(), Greeter()])
    assert pm.hook.oogiri_greeting(name="a") == "ようこそ、aさん"  # firstresult from the spec

    class Wrong:
        @hookimpl
        def oogiri_greeting(self, nam):
            return "typo"

    with pytest.raises(PluginValidationError):
        pm.register(Wrong())

    late = make_manager([], extra=[Polite()])
    late.register(Greeter())  # historic: a plugin registered later still declares its hooks
    assert late.hook.oogiri_greeting.spec is not None
