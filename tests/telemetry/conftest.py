"""Fixtures that start real server processes for the telemetry tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from telemetry.servers import ServerFactory, server_factory


@pytest.fixture
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start servers owned by one test; all stopped (and their databases dropped) afterwards."""
    with ExitStack() as stack:
        yield server_factory(stack, lambda: tmp_path_factory.mktemp("kamiyo"))
