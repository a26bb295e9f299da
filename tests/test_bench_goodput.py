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
