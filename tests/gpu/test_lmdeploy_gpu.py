# ruff: noqa: ASYNC230, ASYNC240
"""LMDeploy on a real GPU: the bot answers through it, a swap under load fails nothing, and real
HTTP exchanges are captured as replay fixtures.

Skips without CUDA or without an importable ``lmdeploy``. One run starts one api_server (plus one
more for the swap) and shares it between the checks, since each start costs a minute or more:

    python -m pytest tests/gpu/test_lmdeploy_gpu.py --noconftest -q      # pytest, or
    python tests/gpu/test_lmdeploy_gpu.py                                  # no pytest needed

Environment: ``OUT`` (default ./gpu-out) receives report.json, swap.log, the servers' logs and
``fixtures/`` (captured transcripts, to copy over tests/fixtures/lmdeploy/); ``OOGIRI_GPU_MODEL``
an InternVL2-layout model folder (default: the project's tiny random one, built here);
``OOGIRI_GPU_BACKEND`` (default pytorch: the PyPI TurboMind build needs CUDA 12 libraries).
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

API_KEY = "sk-oogiri-gpu-test"
PROMPT = "请你根据这张图片，讲一个脑洞大开的梗"


FAKE = os.environ.get("OOGIRI_GPU_FAKE") == "1"  # dry run of this file on CPU with the fake server


def why_skip() -> str | None:
    if FAKE:
        return None
    if importlib.util.find_spec("lmdeploy") is None:
        return "lmdeploy is not importable"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or "gpu-out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port_block(n: int = 8, start: int = 24000) -> int:
    for base in range(start, start + 2000, n):
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


def photo(size: tuple[int, int] = (1344, 896)) -> bytes:
    from PIL import Image, ImageDraw

    try:
        import skimage

        img = Image.open(Path(skimage.__file__).parent / "data" / "chelsea.png").convert("RGB")
    except Exception:
        img = Image.new("RGB", (640, 480), (230, 200, 150))
        draw = ImageDraw.Draw(img)
        draw.ellipse((200, 100, 440, 380), fill=(90, 60, 30))
    img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def model_folders(work: Path) -> tuple[Path, Path]:
    """Model A (given or built) and model B: the same files under another name (cheap swap)."""
    given = os.environ.get("OOGIRI_GPU_MODEL")
    if given:
        a = Path(given)
    else:
        from bot.engines.internvl.tinymodel import make_tiny_model

        a = make_tiny_model(work / "tiny-a", layout="internvl2", seed=0)
    b = work / "tiny-b"
    b.mkdir(exist_ok=True)
    for item in a.iterdir():
        target = b / item.name
        if not target.exists():
            target.symlink_to(item.resolve())
    return a, b


def expected_prompt_tokens(model: Path, rendered: str, image_tokens: int) -> int | None:
    """Prompt tokens LMDeploy should count for ``rendered`` (segments around the picture)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    path = model / "tokenizer.json"
    if not path.exists():
        return None
    tok = Tokenizer.from_file(str(path))
    before, after = rendered.split("<IMG_CONTEXT>", 1)
    return (
        len(tok.encode(before, add_special_tokens=False).ids)
        + image_tokens
        + len(tok.encode(after, add_special_tokens=False).ids)
    )


class Report:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.checks: dict[str, dict[str, Any]] = {}

    def record(self, name: str, ok: bool | None, **info: Any) -> None:
        self.checks[name] = {"ok": ok, **info}
        print(f"[{'PASS' if ok else 'SKIP' if ok is None else 'FAIL'}] {name}: "
              f"{json.dumps(info, ensure_ascii=False, default=str)[:400]}", flush=True)  # fmt: skip
        self.save()

    def save(self) -> None:
        (self.out / "report.json").write_text(
            json.dumps(self.checks, indent=2, ensure_ascii=False, default=str)
        )


async def scenario(report: Report) -> None:
    from pydantic import SecretStr

    from bot.engines.lmdeploy_server import ManagedLMDeploy, ServerProcess
    from bot.engines.openai_http import OpenAIHTTPEngine, Upstream
    from bot.engines.tiling import server_grid
    from bot.models import EngineError, GenerationParams
    from bot.settings import Settings

    out = report.out
    work = Path(tempfile.mkdtemp(prefix="oogiri-gpu-"))
    t0 = time.monotonic()
    model_a, model_b = await asyncio.to_thread(model_folders, work)
    report.record("model", True, a=str(model_a), b=str(model_b), build_s=time.monotonic() - t0)
    port = free_port_block()
    settings = Settings(
        _env_file=None,
        data_dir=work / "data",
        plugins=[],
        engine={
            "name": "lmdeploy",
            "manage": True,
            "model": str(model_a),
            "model_version": "tiny-a",
            "backend": os.environ.get("OOGIRI_GPU_BACKEND", "pytorch"),
            "port": port,
            "api_key": API_KEY,
            "session_len": 8192,
            "cache_max_entry_count": 0.05,
            "max_batch_size": 64,
            "server_threads": 2,
            "startup_timeout_s": 420,
            "drain_timeout_s": 120,
            "timeout_s": 180,
            "max_new_tokens": 16,
            "max_dynamic_patch": 6,
            "retries": 2,
            "request_extra": {"min_new_tokens": 16, "ignore_eos": True},
            "server_command": (
                [sys.executable, str(ROOT / "tests" / "fakes" / "fake_lmdeploy.py")] if FAKE else []
            ),
        },
    )
    ServerProcess.STOP_GRACE_S = 30.0
    engine = ManagedLMDeploy(settings)
    try:
        # ---- 1. start, health, answer -------------------------------------------------
        t0 = time.monotonic()
        await engine.start()
        report.record("start", True, healthy_after_s=round(time.monotonic() - t0, 1),
                      command=engine.active.status()["command"])  # fmt: skip
        from bot.engines.openai_http import clean_text  # noqa: F401  (import check)
        from bot.models import NormalizedImage

        jpeg = photo((4032, 3024))

        from PIL import Image

        with Image.open(io.BytesIO(jpeg)) as im:
            size = im.size
        image = NormalizedImage.of(jpeg, size[0], size[1], "JPEG")
        answers = {}
        for mdp in (1, 6, 12):
            gen = await engine.generate(image, PROMPT, GenerationParams(16, 0.8, 0.9, mdp))
            grid = server_grid(*size, mdp)
            answers[mdp] = {
                "text": gen.text,
                "prompt_tokens": gen.usage.prompt_tokens,
                "completion_tokens": gen.usage.completion_tokens,
                "grid": [grid.cols, grid.rows],
                "image_tokens": grid.image_tokens(),
                "latency_s": round(gen.latency_s, 3),
            }
        text_tokens = {m: a["prompt_tokens"] - a["image_tokens"] for m, a in answers.items()}
        same_text = len(set(text_tokens.values())) == 1
        report.record(
            "answer_through_engine",
            all(a["text"] for a in answers.values()) and same_text,
            answers=answers,
            text_tokens=text_tokens,
            note="prompt_tokens - 256×(tiles+thumbnail) must be the same at 1/6/12 tiles",
        )

        # ---- 2. the served template is ours (token count of the rendered prompt) ---------
        sys.path.insert(0, str(ROOT / "tests" / "engines"))
        from test_chat_template import render_lmdeploy, template

        body = engine.http.build_payload(
            "m", "data:image/jpeg;base64,AA", PROMPT, GenerationParams()
        )
        ours = render_lmdeploy(template(), body["messages"], 1)
        expected = expected_prompt_tokens(model_a, ours, 0)
        stock = dict(
            template(),
            meta_instruction="你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
            "英文名叫InternVL, 是一个有用无害的人工智能助手。",
            eosys="<|im_end|>\n",
            eoh="<|im_end|>\n",
            separator="\n",
        )
        stock_expected = expected_prompt_tokens(
            model_a, render_lmdeploy(stock, body["messages"], 1), 0
        )
        measured = text_tokens[1]
        report.record(
            "served_template",
            None if expected is None or FAKE else abs(measured - expected) <= 1,
            measured_text_tokens=measured,
            expected_with_our_template=expected,
            expected_with_stock_internvl2_template=stock_expected,
        )

        # ---- 3. the bot's service path ---------------------------------------------------
        try:
            from bot.app import App
            from bot.models import JokeRequest
            from bot.plugins import make_manager
        except ImportError as exc:
            report.record("answer_through_service", None, skipped=f"core deps missing: {exc}")
        else:
            app = await App.create(settings, pm=make_manager([]), engine=engine)
            try:
                joke = await app.service.tell(
                    JokeRequest(image_bytes=photo(), channel="gpu", user_id="gpu:1")
                )
                report.record("answer_through_service", bool(joke.text), joke_id=joke.id,
                              text=joke.text, model_version=joke.model_version)  # fmt: skip
            finally:
                app.engine = None  # the engine outlives this app; close only the rest
                await app.store.close()
                await app.limiter.close()

        # ---- 4. capture real transcripts ----------------------------------------------------
        import argparse

        from bench import capture_lmdeploy

        proxy = None
        proxy_url = None
        try:
            if FAKE:
                raise RuntimeError("no lmdeploy serve proxy in a dry run")
            proxy_port = port + 7
            log = open(out / "proxy.log", "wb")
            proxy = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lmdeploy", "serve", "proxy", "--server-name", "127.0.0.1",
                "--server-port", str(proxy_port), stdout=log, stderr=asyncio.subprocess.STDOUT,
                cwd=work,
            )  # fmt: skip
            import httpx

            async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
                for _ in range(120):
                    await asyncio.sleep(0.5)
                    if proxy.returncode is not None:
                        raise RuntimeError(f"lmdeploy serve proxy exited ({proxy.returncode})")
                    try:
                        r = await client.post(
                            f"http://127.0.0.1:{proxy_port}/nodes/add",
                            json={"url": engine.active.url,
                                  "status": {"models": [engine.active.served_name]}},
                        )  # fmt: skip
                        if r.status_code == 200:
                            proxy_url = f"http://127.0.0.1:{proxy_port}"
                            break
                    except httpx.HTTPError:
                        continue
        except Exception as exc:  # the proxy exchange is a bonus: note it, do not fail on it
            report.record("proxy", None, error=repr(exc))
        args = argparse.Namespace(
            base_url=engine.active.url, api_key=API_KEY, model=None, image=None,
            proxy_url=proxy_url, overload=0, lmdeploy_version=None, timeout=300.0,
            out=str(out / "fixtures"), dry_run=False,
        )  # fmt: skip
        try:
            import lmdeploy

            args.lmdeploy_version = lmdeploy.__version__
        except Exception:
            pass
        cap = await asyncio.to_thread(capture_lmdeploy.capture, args)
        report.record(
            "capture",
            {"health", "models", "chat_success", "chat_unauthorized", "chat_bad_image"}
            <= set(cap.kept),
            kept=cap.kept,
            skipped=cap.skipped,
            proxy=proxy_url,
        )
        if proxy is not None and proxy.returncode is None:
            proxy.terminate()
            await proxy.wait()

        # the client against what was just captured: the classification must hold
        from bot.models import ImageRejected

        checks = {}
        bad = Path(out / "fixtures" / "chat_bad_image.json")
        if bad.exists():
            doc = json.loads(bad.read_text())
            checks["bad_image_status"] = doc["response"]["status"]
        probe = OpenAIHTTPEngine(
            settings.engine, upstream=Upstream.of([engine.active.url], engine.active.served_name)
        )
        try:
            broken = NormalizedImage(b"\xff\xd8 not a jpeg", "0" * 64, 800, 600, "JPEG")
            try:
                await probe.generate(broken, PROMPT, GenerationParams(8))
                checks["bad_image"] = "accepted?!"
            except ImageRejected as exc:
                checks["bad_image"] = f"ImageRejected: {exc.detail[:200]}"
            except EngineError as exc:
                checks["bad_image"] = f"EngineError (should be ImageRejected): {exc.detail[:200]}"
        finally:
            await probe.close()
        wrong = OpenAIHTTPEngine(
            settings.engine.model_copy(update={"api_key": SecretStr("wrong")}),
            upstream=Upstream.of([engine.active.url], engine.active.served_name),
        )
        try:
            try:
                await wrong.generate(image, PROMPT, GenerationParams(8))
                checks["bad_key"] = "accepted?!"
            except EngineError as exc:
                checks["bad_key"] = exc.detail[:200]
        finally:
            await wrong.close()
        report.record(
            "client_against_real_errors",
            checks.get("bad_image", "").startswith("ImageRejected")
            and "bad API key" in checks.get("bad_key", ""),
            **checks,
        )

        # ---- 5. swap under continuous load ------------------------------------------------
        stop = asyncio.Event()
        small = NormalizedImage(photo((896, 672)), "1" * 64, 896, 672, "JPEG")
        results: list[tuple[float, str]] = []
        failures: list[str] = []

        async def worker() -> None:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                try:
                    gen = await engine.generate(small, PROMPT, GenerationParams(16, 0.8, 0.9, 6))
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {getattr(exc, 'detail', exc)}")
                    await asyncio.sleep(0.05)
                else:
                    results.append((loop.time(), gen.model))

        events: list[str] = []

        def progress(message: str) -> None:
            line = f"{time.strftime('%H:%M:%S')} swap: {message}"
            events.append(line)
            print(line, flush=True)

        tasks = [asyncio.create_task(worker()) for _ in range(16)]
        await asyncio.sleep(5)
        before = len(results)
        swap_error = None
        try:
            result = await engine.swap(model_b, label="tiny-b", progress=progress)
        except Exception as exc:
            swap_error = repr(exc)
            result = {}
        await asyncio.sleep(5)
        stop.set()
        await asyncio.gather(*tasks)
        labels = [m for _, m in results]
        (out / "swap.log").write_text(
            "\n".join(events) + f"\nrequests: {len(results)} ok ({before} before the swap began), "
            f"{len(failures)} failed; answered by tiny-a: {labels.count('tiny-a')}, "
            f"tiny-b: {labels.count('tiny-b')}\n"
            + ("\n".join(failures[:20]) + "\n" if failures else ""),
            encoding="utf-8",
        )
        report.record(
            "swap_under_load",
            swap_error is None and not failures and "tiny-b" in labels and "tiny-a" in labels,
            result=result,
            error=swap_error,
            answered=len(results),
            failed=len(failures),
            failures=failures[:5],
            by_model={"tiny-a": labels.count("tiny-a"), "tiny-b": labels.count("tiny-b")},
        )
    finally:
        await engine.close()
        logs = settings.data_dir / "logs"
        if logs.exists():
            shutil.copytree(logs, out / "logs", dirs_exist_ok=True)


_RESULT: Report | None = None


def run_all() -> Report:
    global _RESULT
    if _RESULT is None:
        report = Report(out_dir())
        try:
            asyncio.run(scenario(report))
        except Exception:
            report.record("scenario", False, error=traceback.format_exc()[-3000:])
        _RESULT = report
    return _RESULT


# --------------------------------------------------------------------------- pytest entry points

try:
    import pytest
except ImportError:  # script mode on a machine without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.skipif(why_skip() is not None, reason=why_skip() or ""),
    ]

    @pytest.mark.parametrize(
        "check",
        [
            "start",
            "answer_through_engine",
            "served_template",
            "answer_through_service",
            "capture",
            "client_against_real_errors",
            "swap_under_load",
        ],
    )
    def test_lmdeploy_on_gpu(check: str) -> None:
        report = run_all()
        if "scenario" in report.checks:
            pytest.fail(report.checks["scenario"]["error"])
        got = report.checks.get(check)
        assert got is not None, f"{check} did not run"
        if got["ok"] is None:
            pytest.skip(json.dumps(got, ensure_ascii=False, default=str)[:300])
        assert got["ok"], json.dumps(got, ensure_ascii=False, default=str)[:2000]


if __name__ == "__main__":
    reason = why_skip()
    if reason:
        print(f"skipped: {reason}")
        sys.exit(0)
    final = run_all()
    failed = [k for k, v in final.checks.items() if v["ok"] is False]
    print(json.dumps({"failed": failed, "out": str(final.out)}, indent=2))
    sys.exit(1 if failed else 0)
