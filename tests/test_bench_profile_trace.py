"""bench/profile_trace: kernels land in the phase of the range that launched them."""

from __future__ import annotations

import pytest

from bench.profile_trace import analyse


def ev(name: str, cat: str, ts: float, dur: float, corr: int | None = None, tid: int = 1) -> dict:
    e = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": tid}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_phases_idle_and_per_joke() -> None:
    events = [
        ev("startup_kernel", "kernel", 0, 10, corr=99),  # before a long gap: not the load
        ev("cudaLaunchKernel", "cuda_runtime", 0, 1, corr=99),
        ev("oogiri::prefill", "user_annotation", 10_000_000, 1000),
        ev("oogiri::vision", "user_annotation", 10_000_010, 400),
        ev("cudaLaunchKernel", "cuda_runtime", 10_000_020, 1, corr=1),
        ev("vit_gemm", "kernel", 10_000_100, 300, corr=1, tid=7),
        ev("cudaLaunchKernel", "cuda_runtime", 10_000_500, 1, corr=2),
        ev("llm_gemm", "kernel", 10_000_500, 200, corr=2, tid=7),
        ev("cudaGraphLaunch", "cuda_runtime", 10_001_500, 1, corr=3),
        ev("decode_kernel", "kernel", 10_001_000, 100, corr=3, tid=7),
        ev("cudaLaunchKernel", "cuda_runtime", 10_001_600, 1, corr=4),
        ev("sampling", "kernel", 10_001_200, 50, corr=4, tid=7),
    ]
    out = analyse(events, jokes=2)
    assert out["kernel_s"] == pytest.approx(
        {"vision": 300e-6, "prefill": 200e-6, "decode": 100e-6, "other": 50e-6}
    )
    assert out["window_s"] == pytest.approx(1150e-6)
    assert out["idle_s"] == pytest.approx((1150 - 650) * 1e-6)
    assert out["per_joke_ms"]["vision"] == pytest.approx(0.15)
    assert out["top_kernels"][0]["name"] == "vit_gemm"
