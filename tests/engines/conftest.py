"""Fixtures for the HTTP engine tests: loopback fake LMDeploy servers and real pictures."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from enginesupport import jpeg_image
from fake_lmdeploy import FakeLMDeploy

from bot.models import NormalizedImage


@pytest.fixture
def image() -> NormalizedImage:
    return jpeg_image(800, 600)


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeLMDeploy]]:
    """Start fake servers; at teardown stop them and check no non-data: URL ever reached one."""
    started: list[FakeLMDeploy] = []

    def start(**kwargs: object) -> FakeLMDeploy:
        fake = FakeLMDeploy(**kwargs).start()  # type: ignore[arg-type]
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()
    for fake in started:
        assert fake.violations == [], f"non-data: image URLs reached the server: {fake.violations}"


@pytest.fixture
def fake(fake_server: Callable[..., FakeLMDeploy]) -> FakeLMDeploy:
    return fake_server()
