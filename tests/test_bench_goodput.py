"""bench/goodput.py against the fake api_server on loopback: open loop, SLO share, goodput."""

from __future__ import annotations

import pytest

from bench.common import Sample
from bench.goodput import Plan, Step, goodput, render_markdown, run_step, summarize
from tests.fakes.fake_lmdeploy import FakeLMDeploy


def plan_for(url: str, rates: list[float]) -> Plan:
    return Plan.model_validate(
        {
            "image_size": [64, 64],
            "max_new_tokens": 4,
            "max_dynamic_patch": 1,
            "slo_s": 0.5,
            "groups": {"fake": {"base_urls": [url]}},
            "steps": [
                {
                    "name": "raw",
                    "group": "fake",
                    "rates": rates,
                    "warmup_s": 0.2,
                    "duration_s": 2.0,
                    "stop_after_misses": 0,
                }
            ],
        }
    )


async def test_a_server_past_its_capacity_misses_the_slo(tmp_path) -> None:
    """Capacity 2 × 0.1 s = 20/s: 5/s meets a 0.5 s SLO, 40/s cannot (its queue only grows)."""
    with FakeLMDeploy(delay_s=0.1, capacity=2) as fake:
        plan = plan_for(fake.url, [5, 40])
        rows = await run_step(plan.steps[0], plan, [fake.url], tmp_path, 0, deadline=1e12)
    low, high = rows
    assert low["meets_slo"] and low["p95_s"] < 0.5 and low["ok"] == low["arrivals"]
    assert not high["meets_slo"] and high["p95_s"] > 0.5
    assert high["good_per_s"] < 25  # never above what the server can do
    assert goodput(rows) == {"raw": 5}
    assert "goodput 5.0" in render_markdown(
        {
            "meta": {
                "slo_s": 0.5,
                "machine": "m",
                "commit": "c",
                "when": "w",
                "max_new_tokens": 4,
                "max_dynamic_patch": 1,
                "image_size": [64, 64],
            },
            "rows": rows,
        }
    )


def test_a_busy_answer_counts_against_the_slo_however_fast() -> None:
    plan = plan_for("http://x", [1])
    samples = [Sample(0, 0.1, True)] * 90 + [Sample(0, 0.01, False, error="busy")] * 10
    row = summarize(samples, 10.0, plan.steps[0], plan)
    assert row["busy"] == 10 and row["errors"] == {}
    assert row["within_slo"] == 0.9 and not row["meets_slo"]
    assert row["p95_s"] == pytest.approx(0.1)  # of the jokes answered


def test_a_plan_with_an_unknown_key_is_refused() -> None:
    with pytest.raises(ValueError, match="extra"):
        Step.model_validate({"name": "x", "group": "g", "rates": [1], "rate": 3})


def device_like(**step: object) -> dict:
    return {
        "model": "MODEL",
        "groups": {
            "main": {"launch": {"servers": 2}},
            "cache": {"launch": {"servers": 1, "extra_args": ["--enable-prefix-caching"]}},
        },
        "steps": [{"name": "s", "group": "main", "rates": [1]} | step],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"group": "nope"}, "no group"),
        ({"group": "cache", "kind": "prefix_cache_check"}, "logprobs-mode"),
        ({"kind": "warmup", "path": "bot"}, "is raw"),
        ({"bot_env": {"POOL__ENABLED": "true"}}, "OOGIRI_"),
        ({"with_next": True}, "with_next"),
    ],
)
def test_a_plan_that_would_fail_on_the_device_is_refused_here(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Plan.model_validate(device_like(**change))


def test_a_check_may_run_beside_a_warm_up_and_profile_step_must_exist() -> None:
    doc = device_like(kind="prefix_cache_check", group="fake", with_next=True)
    doc["groups"]["fake"] = {"fake": {}}
    doc["steps"].append({"name": "w", "group": "main", "kind": "warmup", "rates": [5]})
    Plan.model_validate(doc)
    with pytest.raises(ValueError, match="profile_step"):
        Plan.model_validate(doc | {"profile_step": "nope"})
    doc["steps"][1]["name"] = "s"
    with pytest.raises(ValueError, match="unique"):
        Plan.model_validate(doc)


def test_zipf_pictures_pair_across_steps_but_not_across_rates(monkeypatch) -> None:
    import bench.goodput as goodput_mod

    monkeypatch.setattr(
        goodput_mod, "photo_jpegs", lambda n, *a, **k: [b"%d" % i for i in range(n)]
    )
    plan = Plan.model_validate(
        device_like(workload="zipf", zipf_items=50, rates=[10, 20], path="bot")
    )
    pictures, order_for = goodput_mod.pictures_for(plan.steps[0], plan)
    assert len(pictures) == 50
    assert order_for(10) == order_for(10)  # the pool-on and pool-off steps send the same
    assert order_for(10) != order_for(20)  # a higher rate is not a replay of the lower one
    assert max(order_for(20)) < 50


async def test_pool_answers_are_read_from_the_bots_metrics() -> None:
    import httpx

    from bench.goodput import pool_answers

    text = (
        "# HELP oogiri_joke_pool_answers Jokes answered from the joke pool or by the engine\n"
        'oogiri_joke_pool_answers{source="pool"} 12.0\n'
        'oogiri_joke_pool_answers{source="engine"} 30.0\n'
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if "nopool" in str(request.url):
            return httpx.Response(200, text="oogiri_jokes_total 3\n")
        return httpx.Response(200, text=text)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        assert await pool_answers(client, ["http://a", "http://b"]) == {
            "pool": 24.0,
            "engine": 60.0,
        }
        assert await pool_answers(client, ["http://nopool"]) is None


async def test_a_warm_up_is_reported_apart_and_results_are_saved_per_step(tmp_path) -> None:
    import json

    from bench.goodput import run

    with FakeLMDeploy(delay_s=0.05, capacity=4) as fake:
        plan = plan_for(fake.url, [5])
        doc = plan.model_dump()
        doc["steps"].insert(
            0,
            {
                "name": "warm",
                "group": "fake",
                "kind": "warmup",
                "rates": [5],
                "duration_s": 1.0,
                "warmup_s": 0.2,
            },
        )
        plan = Plan.model_validate(doc)
        result = await run(plan, tmp_path, 0, deadline_s=600, startup_s=10)
    assert [r["step"] for r in result["rows"]] == ["raw"]
    assert result["meta"]["warmups"]["warm"][0]["arrivals"] > 0
    saved = json.loads((tmp_path / "goodput-results.json").read_text())
    assert saved["meta"]["partial"] and [r["step"] for r in saved["rows"]] == ["raw"]
    assert "warm-up warm (not in the table)" in render_markdown(result)


def test_a_rendered_table_goes_into_its_own_block_of_the_section(tmp_path) -> None:
    from bench.goodput import into_doc

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n<!-- bench:goodput -->\nprose kept\n<!-- /bench:goodput -->\ntail\n")
    into_doc("| table 1 |", "device-2", doc)
    into_doc("| table 2 |", "device-2", doc)  # replaced, not added twice
    text = doc.read_text()
    assert text.count("| table") == 1 and "| table 2 |" in text and "prose kept" in text
    assert text.index("| table 2 |") < text.index("<!-- /bench:goodput -->") < text.index("tail")


def test_every_device_plan_turns_into_a_cpu_dry_run() -> None:
    from pathlib import Path

    from bench.goodput import as_cpu_dry_run

    for path in sorted(Path("bench/plans").glob("goodput-device*.json")):
        plan = Plan.model_validate_json(path.read_text())
        dry = as_cpu_dry_run(plan, 0.25)
        Plan.model_validate(dry.model_dump())  # still a valid plan
        for name, group in dry.groups.items():
            if group.launch is not None:
                assert "fake_lmdeploy.py" in group.launch.server_command[-1], name
                assert group.launch.extra_args == plan.groups[name].launch.extra_args
        assert [s.rates for s in dry.steps] == [
            [round(r * 0.25, 2) for r in s.rates] for s in plan.steps
        ]
