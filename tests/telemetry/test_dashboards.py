"""The alert rules and the Grafana dashboard only use metrics that GET /metrics really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from appclient import AppClient
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.processing.worker import Worker
from kamiyo.telemetry.metrics import WebhookMetrics
from kamiyo.web.app import WEBHOOK_PATH, create_app
from support import signed

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Metric names are the identifiers our families start with; PromQL functions and labels are not.
_NAME = re.compile(r"\b((?:webhook|stripe|kamiyo)_[a-z_]+)\b")


def _exported(engine: Engine, settings: Settings) -> set[str]:
    metrics = WebhookMetrics()
    event = synthetic.event("customer.created", synthetic.customer(customer_id="cus_d", email="d@example.com"))
    with AppClient(create_app(settings, engine=engine, run_worker=False, metrics=metrics)) as http:
        body, headers = signed(event)
        assert http.post(WEBHOOK_PATH, content=body, headers=headers).status_code == 200
        Worker(engine, settings, metrics=metrics).run_once()
        page = http.get("/metrics").text
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for family in text_string_to_metric_families(page):
        # A labelled counter with no child yet has no sample, only its family: still exported.
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def _used(text: str) -> set[str]:
    return set(_NAME.findall(text))


def test_every_metric_in_the_alert_rules_is_exported(engine: Engine, settings: Settings) -> None:
    used = _used((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert "webhook_failures_total" in used  # the extraction itself works
    assert used - _exported(engine, settings) == set()


def test_every_metric_on_the_dashboard_is_exported(engine: Engine, settings: Settings) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "kamiyo-webhooks.json").read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    used = _used(exprs)
    assert len(used) >= 10
    assert used - _exported(engine, settings) == set()
