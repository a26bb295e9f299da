"""The HTTP engine against a loopback fake LMDeploy that replays recorded transcripts."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import httpx
import pytest
from enginesupport import engine_settings, jpeg_image
from fake_lmdeploy import FIXTURES, FakeLMDeploy, load_fixture

from bot.engines import lmdeploy_plugin
from bot.engines.base import Engine
from bot.engines.lmdeploy_server import make_lmdeploy_engine
from bot.engines.openai_http import (
    DATA_URL_PREFIX,
    CircuitBreaker,
    OpenAIHTTPEngine,
    Upstream,
    assert_only_data_urls,
    body_error,
    clean_text,
    normalize_base_url,
    oogiri_register_engines,
)
from bot.models import (
    EngineBusy,
    EngineError,
    GenerationParams,
    ImageRejected,
    NormalizedImage,
)
from bot.settings import Settings

PARAMS = GenerationParams(max_new_tokens=32, temperature=0.7, top_p=0.8, max_dynamic_patch=6)
PROMPT = "请你根据这张图片，讲一个脑洞大开的梗"


def fixture_text(name: str) -> str:
    return load_fixture(name)["response"]["body"]["choices"][0]["message"]["content"]


def chats(fake: FakeLMDeploy) -> list[dict]:
    return [r for r in fake.requests if r["path"] == "/v1/chat/completions"]


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make_engine():
    engines: list[OpenAIHTTPEngine] = []

    def make(*urls: str, flavor: str = "lmdeploy", **overrides: object) -> OpenAIHTTPEngine:
        clock = overrides.pop("clock", None)
        kwargs = {"clock": clock} if clock else {}
        engine = OpenAIHTTPEngine(engine_settings(*urls, **overrides), flavor=flavor, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close()


# --------------------------------------------------------------------------- fixtures on disk


def test_fixtures_have_the_replay_format() -> None:
    files = sorted(FIXTURES.glob("*.json"))
    assert len(files) >= 12
    for path in files:
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert doc["name"] == path.stem
        assert doc["source"] in ("synthetic", "captured")
        assert {"method", "path"} <= set(doc["request"])
        response = doc["response"]
        assert isinstance(response["status"], int) and isinstance(response["headers"], dict)
        assert sum(k in response for k in ("body", "body_text", "sse")) == 1
        assert "Bearer" not in path.read_text(encoding="utf-8")  # keys are never recorded


# --------------------------------------------------------------------------- success


async def test_success_replays_recorded_answer(fake_server, make_engine, image) -> None:
    fake = fake_server(script=["chat_success"])
    engine = make_engine(fake.url)
    assert isinstance(engine, Engine)
    gen = await engine.generate(image, PROMPT, PARAMS)
    body = load_fixture("chat_success")["response"]["body"]
    assert gen.text == clean_text(fixture_text("chat_success")) and gen.text
    assert gen.usage.prompt_tokens == body["usage"]["prompt_tokens"]
    assert gen.usage.completion_tokens == body["usage"]["completion_tokens"]
    assert gen.model == "fake-internvl2"  # discovered from /v1/models
    assert gen.latency_s > 0


async def test_request_shape(fake_server, make_engine, image) -> None:
    fake = fake_server(api_keys=["sk-test"])
    engine = make_engine(
        fake.url + "/v1/",
        api_key="sk-test",
        request_extra={"ignore_eos": True, "min_new_tokens": 32},
        presize_to_tiles=False,
    )
    await engine.generate(image, f"  {PROMPT}\n", GenerationParams(max_dynamic_patch=3, seed=7))
    (req,) = chats(fake)
    assert req["auth"] == "good"
    assert req["order"] == ["image_url", "text"]  # picture first, as XTuner trains
    assert req["texts"] == [PROMPT]  # stripped, as XTuner strips
    (img,) = req["images"]
    assert img["data_url"] and img["decodable"] and img["scheme"].startswith("data:image/jpeg")
    assert img["max_dynamic_patch"] == 3 and img["size"] == [800, 600]
    assert req["max_tokens"] == 64 and req["temperature"] == 0.8 and req["top_p"] == 0.9
    assert req["stream"] is False
    assert req["extra"] == {"seed": 7, "ignore_eos": True, "min_new_tokens": 32}


async def test_openai_flavor_sends_plain_openai_fields(fake_server, make_engine) -> None:
    fake = fake_server()
    engine = make_engine(fake.url, flavor="openai", served_model_name="served")
    big = jpeg_image(1600, 1200)
    gen = await engine.generate(big, PROMPT, PARAMS)
    (req,) = chats(fake)
    assert req["model"] == "served" and gen.model == "served"
    (img,) = req["images"]
    assert img["max_dynamic_patch"] is None  # no LMDeploy-only field
    assert img["size"] == [1600, 1200]  # no InternVL pre-sizing unless asked for
    assert not [r for r in fake.requests if r["path"] == "/v1/models"]
    assert engine.name == "openai"
    assert "min_new_tokens" not in req["extra"]  # not an OpenAI field; request_extra can add one


async def test_lmdeploy_is_told_not_to_end_before_the_first_token(
    fake_server, make_engine, image
) -> None:
    """The learning loop's round-2 model ended half its answers at once: 49 of 192 blank → 503."""
    fake = fake_server()
    short = GenerationParams(max_new_tokens=4)
    await make_engine(fake.url).generate(image, PROMPT, short)
    await make_engine(fake.url, min_new_tokens=16).generate(image, PROMPT, short)
    await make_engine(fake.url, min_new_tokens=0).generate(image, PROMPT, short)
    sent = [r["extra"].get("min_new_tokens") for r in chats(fake)]
    assert sent == [1, 4, None]  # the default; never above max_tokens; 0 turns it off


async def test_template_leftovers_are_stripped(fake_server, make_engine, image) -> None:
    fake = fake_server(script=["chat_template_leftovers"])
    gen = await make_engine(fake.url).generate(image, PROMPT, PARAMS)
    raw = fixture_text("chat_template_leftovers")
    assert "<|im_end|>" in raw
    assert gen.text == raw.split("<|im_end|>")[0].strip()
    assert "<|" not in gen.text


def test_clean_text() -> None:
    assert clean_text("  笑话<|im_end|>\n<|im_start|>user\n更多") == "笑话"
    assert clean_text("<s>笑话</s>") == "笑话"
    assert clean_text("a<IMG_CONTEXT>b") == "ab"
    assert clean_text("<|im_end|>") == ""
    assert clean_text("\ufffd\ufffd这只猫\ufffd看起 ") == "这只猫看起"  # broken bytes, as seen
    assert clean_text("\ufffd") == ""  # → the empty-answer path, never a blank or broken joke


async def test_an_empty_answer_is_asked_again_once(
    fake_server, make_engine, image, tmp_path
) -> None:
    """A model may sample its end token first: one more try, then a clear engine error."""
    doc = load_fixture("chat_success")
    doc["response"]["body"]["choices"][0]["message"]["content"] = "<|im_end|>"
    (tmp_path / "chat_empty.json").write_text(json.dumps(doc))
    for name in ("models", "health"):
        (tmp_path / f"{name}.json").write_text(json.dumps(load_fixture(name)))

    fake = fake_server(fixtures_dir=tmp_path, script=["chat_empty"])  # then healthy answers
    engine = make_engine(fake.url)
    gen = await engine.generate(image, PROMPT, PARAMS)
    assert gen.text and len(chats(fake)) == 2
    assert engine.stats.errors["empty_retried"] == 1 and engine.stats.retries == 0
    assert engine.breaker.state == "closed"

    fake = fake_server(fixtures_dir=tmp_path, script=["chat_empty", "chat_empty"])
    with pytest.raises(EngineError, match="empty answer"):
        await make_engine(fake.url).generate(image, PROMPT, PARAMS)
    assert len(chats(fake)) == 2

    fake = fake_server(fixtures_dir=tmp_path, script=["chat_empty"])
    with pytest.raises(EngineError, match="empty answer"):
        await make_engine(fake.url, empty_answer_retries=0).generate(image, PROMPT, PARAMS)
    assert len(chats(fake)) == 1


# --------------------------------------------------------------------------- never a path


def test_only_data_urls_may_leave() -> None:
    ok = {"messages": [{"content": [{"image_url": {"url": DATA_URL_PREFIX + "AAAA"}}]}]}
    assert_only_data_urls(ok)
    for bad in (
        "file:///etc/passwd",
        "/root/model/secret.jpg",
        "http://169.254.169.254/latest",
        "data:text/plain;base64,AAAA",
        "DATA:image/jpeg;base64,AAAA",
    ):
        payload = {"messages": [{"content": [{"image_url": {"url": bad}}]}]}
        with pytest.raises(EngineError, match="non-data"):
            assert_only_data_urls(payload)
    with pytest.raises(EngineError):
        assert_only_data_urls({"messages": [{"content": [{"image_url": "file:///x.jpg"}]}]})


async def test_a_non_data_url_is_never_sent(fake_server, make_engine, image, monkeypatch) -> None:
    fake = fake_server()
    engine = make_engine(fake.url, served_model_name="m")
    original = engine.build_payload

    def sneaky(model, data_url, prompt, params):
        body = original(model, data_url, prompt, params)
        body["messages"][0]["content"][0]["image_url"]["url"] = "file:///root/model/x.jpg"
        return body

    monkeypatch.setattr(engine, "build_payload", sneaky)
    with pytest.raises(EngineError, match="non-data"):
        await engine.generate(image, PROMPT, PARAMS)
    assert chats(fake) == []


# --------------------------------------------------------------------------- retries


async def test_retries_on_5xx_then_succeeds(fake_server, make_engine, image) -> None:
    fake = fake_server(script=["chat_internal_error", "chat_overloaded", "chat_success"])
    engine = make_engine(fake.url, retries=2)
    gen = await engine.generate(image, PROMPT, PARAMS)
    assert gen.text == clean_text(fixture_text("chat_success"))
    assert len(chats(fake)) == 3 and engine.stats.retries == 2
    assert engine.breaker.state == "closed" and engine.breaker.failures == 0


async def test_retries_are_bounded(fake_server, make_engine, image) -> None:
    fake = fake_server(script=["chat_internal_error"] * 5)
    engine = make_engine(fake.url, retries=1)
    with pytest.raises(EngineError, match="500"):
        await engine.generate(image, PROMPT, PARAMS)
    assert len(chats(fake)) == 2


async def test_overload_after_retries_is_busy(fake_server, make_engine, image) -> None:
    fake = fake_server(script=["chat_overloaded"] * 3)
    with pytest.raises(EngineBusy):
        await make_engine(fake.url, retries=2).generate(image, PROMPT, PARAMS)
    assert len(chats(fake)) == 3


async def test_no_retry_on_4xx(fake_server, make_engine, image) -> None:
    fake = fake_server(script=["chat_context_too_long", "chat_success"])
    engine = make_engine(fake.url, retries=3)
    with pytest.raises(EngineError, match="context length") as info:
        await engine.generate(image, PROMPT, PARAMS)
    assert not isinstance(info.value, ImageRejected)
    assert len(chats(fake)) == 1


async def test_retry_backoff_has_jitter_and_cap(make_engine) -> None:
    engine = make_engine("http://127.0.0.1:9", retry_backoff_s=1.0)
    values = {engine._backoff(1) for _ in range(50)}
    assert len(values) > 10 and all(0.5 <= v <= 1.5 for v in values)
    assert all(engine._backoff(10) <= 7.5 for _ in range(20))


async def test_dropped_connection_is_retried(fake_server, make_engine, image) -> None:
    fake = fake_server(script=[{"close": True}, "chat_success"])
    gen = await make_engine(fake.url, retries=1).generate(image, PROMPT, PARAMS)
    assert gen.text


# --------------------------------------------------------------------------- timeouts


async def test_read_timeout_is_not_retried(fake_server, make_engine, image) -> None:
    fake = fake_server(script=[{"sleep": 1.5}, "chat_success"])
    engine = make_engine(fake.url, timeout_s=0.3, retries=2, served_model_name="m")
    with pytest.raises(EngineError, match=r"no answer .* within 0\.3 s"):
        await engine.generate(image, PROMPT, PARAMS)
    assert len(chats(fake)) == 1


async def test_unreachable_server_fails_after_retries(make_engine, image) -> None:
    engine = make_engine(dead_url(), retries=2, served_model_name="m")
    with pytest.raises(EngineError, match="cannot connect"):
        await engine.generate(image, PROMPT, PARAMS)
    assert engine.stats.retries == 2


# --------------------------------------------------------------------------- auth and images


async def test_401_is_a_clear_bad_key_error(fake_server, make_engine, image) -> None:
    fake = fake_server(api_keys=["right"])
    engine = make_engine(fake.url, api_key="wrong", served_model_name="m", retries=3)
    for _ in range(8):  # never retried, never opens the breaker (the server is fine)
        with pytest.raises(EngineError) as info:
            await engine.generate(image, PROMPT, PARAMS)
        assert "bad API key" in info.value.detail and "401" in info.value.detail
        assert "OOGIRI_ENGINE__API_KEY" in info.value.detail
    assert len(chats(fake)) == 8 and engine.breaker.state == "closed"
    assert "not answering" in info.value.user_message("en")  # users never see key details


async def test_missing_key_fails_model_discovery_clearly(fake_server, make_engine, image) -> None:
    fake = fake_server(api_keys=["right"])
    with pytest.raises(EngineError, match=r"bad API key.*set engine\.api_key"):
        await make_engine(fake.url).generate(image, PROMPT, PARAMS)
    assert fake.requests[-1]["path"] == "/v1/models"


async def test_server_rejected_picture_is_image_rejected(fake_server, make_engine) -> None:
    fake = fake_server()
    broken = NormalizedImage(
        jpeg=b"\xff\xd8 not really a jpeg", sha256="0" * 64, width=800, height=600,
        source_format="JPEG",
    )  # fmt: skip
    engine = make_engine(fake.url, retries=2)
    with pytest.raises(ImageRejected) as info:
        await engine.generate(broken, PROMPT, PARAMS)
    assert len(chats(fake)) == 1  # not retried
    assert info.value.user_message("en") and "picture" in info.value.detail
    assert engine.breaker.failures == 0


# --------------------------------------------------------------------------- proxy quirks


async def test_proxy_200_with_backend_401_body(fake_server, make_engine, image) -> None:
    fake = fake_server(script=["proxy_ok_with_backend_401"])
    with pytest.raises(EngineError, match="bad API key"):
        await make_engine(fake.url, served_model_name="m").generate(image, PROMPT, PARAMS)


async def test_proxy_200_with_timeout_body_is_retried(fake_server, make_engine, image) -> None:
    fake = fake_server(script=["proxy_ok_with_timeout", "chat_success"])
    gen = await make_engine(fake.url, retries=1).generate(image, PROMPT, PARAMS)
    assert gen.text == clean_text(fixture_text("chat_success"))


async def test_proxy_200_unavailable_is_busy(fake_server, make_engine, image) -> None:
    fake = fake_server(script=["proxy_ok_unavailable"] * 2)
    with pytest.raises(EngineBusy):
        await make_engine(fake.url, retries=1).generate(image, PROMPT, PARAMS)


def test_body_error_shapes() -> None:
    for name in ("chat_unauthorized", "proxy_ok_with_backend_401", "models_unauthorized"):
        assert body_error(load_fixture(name)["response"]["body"])[0] == 401
    assert body_error(load_fixture("proxy_ok_with_timeout")["response"]["body"])[0] == 504
    assert body_error(load_fixture("proxy_ok_unavailable")["response"]["body"])[0] == 503
    assert body_error({"error": {"message": "m", "code": "401"}}) == (401, "m")
    assert body_error({"error": "Unauthorized"}) == (None, "Unauthorized")
    assert body_error(load_fixture("chat_success")["response"]["body"]) is None


# --------------------------------------------------------------------------- breaker


def test_breaker_states() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, reset_s=10, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed"
    b.success()  # success resets the count: failures must be consecutive
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow() and 9 < b.retry_after() <= 10
    clock.now += 10
    assert b.allow() and b.state == "half-open"
    assert not b.allow()  # one probe at a time
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.now += 10
    assert b.allow()
    b.release()  # a cancelled probe gives its turn back
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


async def test_breaker_opens_fails_fast_and_closes(fake_server, make_engine, image) -> None:
    clock = Clock()
    fake = fake_server(script=["chat_internal_error"] * 3)
    engine = make_engine(
        fake.url, retries=0, breaker_failures=3, breaker_reset_s=30, clock=clock,
        served_model_name="m",
    )  # fmt: skip
    for _ in range(3):
        with pytest.raises(EngineError):
            await engine.generate(image, PROMPT, PARAMS)
    assert engine.breaker.state == "open"
    before = len(chats(fake))
    with pytest.raises(EngineBusy) as info:
        await engine.generate(image, PROMPT, PARAMS)
    assert "circuit breaker open" in info.value.detail
    assert len(chats(fake)) == before  # failed fast: the server saw nothing
    assert "busy" in info.value.user_message("en")
    clock.now += 31
    # half-open: one probe goes through while a second caller is turned away
    fake.script.append({"sleep": 0.3})
    probe = asyncio.create_task(engine.generate(image, PROMPT, PARAMS))
    await asyncio.sleep(0.1)
    with pytest.raises(EngineBusy):
        await engine.generate(image, PROMPT, PARAMS)
    assert (await probe).text
    assert engine.breaker.state == "closed"
    assert (await engine.generate(image, PROMPT, PARAMS)).text


async def test_failed_probe_reopens(fake_server, make_engine, image) -> None:
    clock = Clock()
    fake = fake_server(script=["chat_internal_error"] * 3)
    engine = make_engine(
        fake.url, retries=0, breaker_failures=2, breaker_reset_s=5, clock=clock,
        served_model_name="m",
    )  # fmt: skip
    for _ in range(2):
        with pytest.raises(EngineError):
            await engine.generate(image, PROMPT, PARAMS)
    clock.now += 6
    with pytest.raises(EngineError):
        await engine.generate(image, PROMPT, PARAMS)  # the probe fails
    assert engine.breaker.state == "open"
    with pytest.raises(EngineBusy):
        await engine.generate(image, PROMPT, PARAMS)


# --------------------------------------------------------------------------- concurrency


async def test_bounded_in_flight(fake_server, make_engine, image) -> None:
    fake = fake_server(delay_s=0.4)
    engine = make_engine(fake.url, max_in_flight=2, served_model_name="m")
    first = [asyncio.create_task(engine.generate(image, PROMPT, PARAMS)) for _ in range(2)]
    await asyncio.sleep(0.1)
    with pytest.raises(EngineBusy, match="max_in_flight"):
        await engine.generate(image, PROMPT, PARAMS)
    assert all(g.text for g in await asyncio.gather(*first))
    assert (await engine.generate(image, PROMPT, PARAMS)).text  # free again
    assert fake.max_active == 2


async def test_many_concurrent_requests_share_the_pool(fake_server, make_engine, image) -> None:
    fake = fake_server(delay_s=0.05)
    engine = make_engine(fake.url, max_in_flight=32, served_model_name="m")
    results = await asyncio.gather(*(engine.generate(image, PROMPT, PARAMS) for _ in range(64)),
                                   return_exceptions=True)  # fmt: skip
    busy = [r for r in results if isinstance(r, EngineBusy)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert len(ok) + len(busy) == 64 and len(ok) >= 32
    assert fake.max_active <= 32


# --------------------------------------------------------------------------- models and URLs


async def test_model_discovery_is_cached(fake_server, make_engine, image) -> None:
    fake = fake_server(model_name="internvl2-oogiri-v3")
    engine = make_engine(fake.url)
    for _ in range(3):
        gen = await engine.generate(image, PROMPT, PARAMS)
    assert gen.model == "internvl2-oogiri-v3"
    assert [r["path"] for r in fake.requests].count("/v1/models") == 1
    assert {r["model"] for r in chats(fake)} == {"internvl2-oogiri-v3"}


async def test_model_label_overrides_served_name(fake_server, make_engine, image) -> None:
    fake = fake_server()
    gen = await make_engine(fake.url, model_version="v7").generate(image, PROMPT, PARAMS)
    assert gen.model == "v7"


async def test_renamed_model_is_rediscovered_once(fake_server, make_engine, image) -> None:
    fake = fake_server(model_name="old")
    engine = make_engine(fake.url)
    await engine.generate(image, PROMPT, PARAMS)
    fake.model_name = "new"
    fake.script.append("chat_model_not_found")
    gen = await engine.generate(image, PROMPT, PARAMS)
    assert gen.model == "new" and chats(fake)[-1]["model"] == "new"


async def test_failover_between_base_urls(fake_server, make_engine, image) -> None:
    fake = fake_server(model_name="m")
    engine = make_engine(dead_url(), fake.url, retries=1)
    results = [await engine.generate(image, PROMPT, PARAMS) for _ in range(6)]
    assert all(r.text for r in results)
    assert len(chats(fake)) == 6
    # the dead URL is skipped for a while after it refused, so later requests go straight through
    assert engine.stats.retries <= 2


async def test_round_robin_over_healthy_urls(fake_server, make_engine, image) -> None:
    a, b = fake_server(model_name="m"), fake_server(model_name="m")
    engine = make_engine(a.url, b.url)
    for _ in range(6):
        await engine.generate(image, PROMPT, PARAMS)
    assert len(chats(a)) == 3 and len(chats(b)) == 3


async def test_failover_when_one_server_dies_midway(fake_server, make_engine, image) -> None:
    a, b = fake_server(model_name="m"), fake_server(model_name="m")
    engine = make_engine(a.url, b.url, retries=1)
    await engine.generate(image, PROMPT, PARAMS)
    a.stop()
    for _ in range(4):
        assert (await engine.generate(image, PROMPT, PARAMS)).text


def test_base_url_normalisation() -> None:
    assert normalize_base_url("http://h:1/v1/") == "http://h:1"
    assert normalize_base_url(" https://h/ ") == "https://h"
    with pytest.raises(ValueError):
        normalize_base_url("h:23333")
    with pytest.raises(ValueError):
        Upstream.of([])


# --------------------------------------------------------------------------- pre-sizing


async def test_presize_sends_the_tile_grid(fake_server, make_engine) -> None:
    fake = fake_server()
    engine = make_engine(fake.url)
    phone = jpeg_image(4032, 3024)
    await engine.generate(phone, PROMPT, GenerationParams(max_dynamic_patch=6))
    await engine.generate(phone, PROMPT, GenerationParams(max_dynamic_patch=12))
    await engine.generate(phone, PROMPT, GenerationParams(max_dynamic_patch=1))
    sizes = [r["images"][0]["size"] for r in chats(fake)]
    tiles = [r["images"][0]["tiles"] for r in chats(fake)]
    assert sizes == [[1344, 896], [1792, 1344], [448, 448]]
    assert tiles == [6, 12, 1]  # the server keeps the grid it would have picked anyway
    assert all(r["images"][0]["bytes"] < len(phone.jpeg) for r in chats(fake))


async def test_presize_off_sends_the_original(fake_server, make_engine) -> None:
    fake = fake_server()
    await make_engine(fake.url, presize_to_tiles=False).generate(
        jpeg_image(1000, 700), PROMPT, PARAMS
    )
    assert chats(fake)[0]["images"][0]["size"] == [1000, 700]


# --------------------------------------------------------------------------- swap support


async def test_switch_and_drain(fake_server, make_engine, image) -> None:
    old = fake_server(model_name="old", delay_s=1.5)
    new = fake_server(model_name="new")
    engine = make_engine(old.url, served_model_name="old")
    slow = asyncio.create_task(engine.generate(image, PROMPT, PARAMS))
    for _ in range(100):  # pre-sizing runs first, in a thread
        if engine.in_flight_to([old.url]):
            break
        await asyncio.sleep(0.02)
    assert engine.in_flight_to([old.url]) == 1
    previous = engine.switch(Upstream.of([new.url], "new", "v2"))
    assert previous.base_urls == (old.url,)
    fresh = await engine.generate(image, PROMPT, PARAMS)
    assert fresh.model == "v2" and len(chats(new)) == 1
    assert not await engine.drain([old.url], timeout_s=0.05)  # still busy
    assert await engine.drain([old.url], timeout_s=5)
    assert (await slow).model == "old"  # finished on the server it started on


async def test_health(fake_server, make_engine) -> None:
    fake = fake_server()
    engine = make_engine(fake.url, dead_url(), served_model_name="m", model_version="v1")
    health = await engine.health()
    assert health.ok and health.model == "v1"
    assert list(health.extra["urls"].values()) == [True, False]
    fake.stop()
    assert not (await engine.health()).ok


# --------------------------------------------------------------------------- registration


def test_registered_as_lmdeploy_and_openai(tmp_path: Path) -> None:
    registered = {}
    settings = Settings(_env_file=None, data_dir=tmp_path)
    oogiri_register_engines(register=registered.__setitem__, settings=settings)
    lmdeploy_plugin.oogiri_register_engines(register=registered.__setitem__, settings=settings)
    assert set(registered) == {"lmdeploy", "openai"}
    lm = registered["lmdeploy"](settings)
    oa = registered["openai"](settings)
    assert lm.name == "lmdeploy" and lm.presize and lm.flavor.send_max_dynamic_patch
    assert oa.name == "openai" and not oa.presize and not oa.flavor.send_max_dynamic_patch
    explicit = Settings(_env_file=None, data_dir=tmp_path, engine={"presize_to_tiles": True})
    assert registered["openai"](explicit).presize
    asyncio.run(lm.close())
    asyncio.run(oa.close())


def test_lmdeploy_factory_picks_managed_mode(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None, data_dir=tmp_path, engine={"manage": True, "model": str(tmp_path)}
    )
    engine = make_lmdeploy_engine(settings)
    assert type(engine).__name__ == "ManagedLMDeploy" and engine.name == "lmdeploy"


async def test_service_path_tells_a_joke_through_lmdeploy(fake_server, tmp_path: Path) -> None:
    from bot.app import App
    from bot.models import JokeRequest

    fake = fake_server(model_name="internvl2-oogiri")
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        engine={"name": "lmdeploy", "base_urls": [fake.url], "model_version": "v1"},
    )
    engine = OpenAIHTTPEngine(settings.engine)
    app = await App.create(settings, engine=engine)
    try:
        photo = jpeg_image(1200, 900)
        joke = await app.service.tell(
            JokeRequest(image_bytes=photo.jpeg, channel="test", user_id="test:a")
        )
        assert joke.text.startswith("[internvl2-oogiri]") and joke.model_version == "v1"
        assert joke.engine == "lmdeploy"
        (req,) = chats(fake)
        assert req["images"][0]["data_url"] and req["images"][0]["on_grid"]
    finally:
        await app.close()


async def test_transport_errors_are_classified(make_engine) -> None:
    engine = make_engine("http://127.0.0.1:9")
    url = "http://x"
    assert engine._transport_failure(url, httpx.ConnectError("no")).retry
    assert not engine._transport_failure(url, httpx.ReadTimeout("slow")).retry
    assert engine._transport_failure(url, httpx.PoolTimeout("pool")).busy
    assert engine._transport_failure(url, httpx.RemoteProtocolError("reset")).retry
