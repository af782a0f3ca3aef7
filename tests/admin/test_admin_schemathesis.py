"""Schemathesis fuzzes ``/admin/api`` of a real ``kamiyo serve`` from its own OpenAPI schema,
which is generated from the pydantic models that validate the requests (``web/admin_models.py``).

Positive cases (what the schema calls valid must be accepted) and negative ones (what it calls
invalid must be a 4xx), every built-in check (no 5xx, documented status codes, content types and
response schemas, auth not ignored, unsupported methods 405): the schema states every bound,
enum and required field, so that both directions hold. Bounded: a fixed seed, a few examples
per operation, and a timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from admin.app_client import ADMIN_TOKEN, BEARER
from admin.events import UNMAPPED_PRICE, customer_created, subscription_created
from e2e.harness import KamiyoServer, wait_until
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.web.admin import openapi_schema
from support import make_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_EXAMPLES = 30


def _config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": 20261128,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
            "phases": {"stateful": {"enabled": False}},
            "headers": BEARER,
            "request-timeout": 30,
        }
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KamiyoServer]:
    """A ``kamiyo serve`` with the console on, a linked customer and a parked failure."""
    with ExitStack() as stack:
        workdir: Path = tmp_path_factory.mktemp("schemathesis")
        url = f"sqlite:///{workdir / 'kamiyo.db'}"
        engine = make_engine(make_settings(url))
        upgrade(engine)
        engine.dispose()
        # Negative cases send wrong tokens on purpose: a throttled fuzzer would test nothing else.
        server = KamiyoServer(workdir, url, KAMIYO_ADMIN_TOKEN=ADMIN_TOKEN, ADMIN_SIGNIN_MAX_FAILURES="10000")
        stack.callback(server.close)
        server.start()
        assert server.deliver(customer_created("ann@example.com", "cus_ann")).status_code == 200
        failed = subscription_created("cus_ann", UNMAPPED_PRICE)
        assert server.deliver(failed).status_code == 200
        wait_until(lambda: server.event_status(failed["id"]) == "failed", what="a parked failure")
        yield server


# The schema as the code builds it; the first test proves the server serves exactly this one.
schema = schemathesis.openapi.from_dict(openapi_schema(), config=_config())


def test_the_server_serves_the_schema_that_is_fuzzed(server: KamiyoServer) -> None:
    served = server.http.get("/admin/api/openapi.json", headers=BEARER)
    assert served.status_code == 200
    assert served.json() == openapi_schema()


@schema.parametrize()
def test_the_admin_api_answers_every_generated_request_as_its_schema_says(
    case: schemathesis.Case, server: KamiyoServer
) -> None:
    case.call_and_validate(base_url=server.url, headers=BEARER)
