"""A Stripe-compatible API on 127.0.0.1, for the reconcile tests and the sync benchmark.

``FakeStripe`` is one account's state (customers, subscriptions, events) plus the faults to
inject; ``StripeApiServer`` serves it over HTTP in Stripe's wire format, so that the official
``stripe`` library, pointed at it through ``STRIPE_API_BASE``, is the client under test.
``InMemoryGateway`` reads the same state without HTTP, for unit tests of the reconcile layer.

Served: ``GET /v1/subscriptions`` (``status`` incl. ``all``, ``customer``, ``limit`` ≤ 100,
``starting_after`` / ``ending_before``, ``expand[]=data.customer``), ``GET /v1/subscriptions/{id}``
(``expand[]=customer``), ``GET /v1/customers`` (``email``), ``GET /v1/customers/{id}``,
``GET /v1/events`` (``type`` with ``*``, ``types[]``, ``created[gte|gt|lte|lt]``,
``delivery_success``, cursors; newest first), ``GET /v1/webhook_endpoints`` (cursors; newest
first). Errors have Stripe's shape: 404
``resource_missing``, 400 for a bad parameter, 401 for a wrong key; ``fail_next`` answers the
next requests with a plain 429 or a 500.
"""

from __future__ import annotations

import email.utils
import itertools
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson

from kamiyo import synthetic
from kamiyo.errors import StripeCursorGone
from kamiyo.reconcile.gateway import EventQuery, Fetched, Page

API_KEY = "sk_test_kamiyo_fake_0123456789"
_MAX_LIMIT = 100
_INDEXED = re.compile(r"^([a-z_]+)\[(\d*)\]$")
_KEYED = re.compile(r"^([a-z_]+)\[([a-z_]+)\]$")


class StripeApiError(Exception):
    """An error answer: HTTP status and Stripe's error object."""

    def __init__(self, status: int, error: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(error.get("message"))
        self.status = status
        self.error = error
        self.headers = headers or {}


def _missing(kind: str, object_id: str, param: str = "id") -> StripeApiError:
    return StripeApiError(
        404 if param == "id" else 400,
        {
            "type": "invalid_request_error",
            "code": "resource_missing",
            "param": param,
            "message": f"No such {kind}: '{object_id}'",
        },
    )


def _bad_param(param: str, message: str) -> StripeApiError:
    return StripeApiError(400, {"type": "invalid_request_error", "param": param, "message": message})


@dataclass
class _Event:
    seq: int
    body: dict[str, Any]
    delivered: bool

    @property
    def key(self) -> tuple[int, int]:
        return int(self.body["created"]), self.seq


@dataclass
class Fault:
    status: int
    path_prefix: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    after: int = 0  # matching requests answered normally before this fault applies


class FakeStripe:
    """One Stripe account in memory. Thread-safe; every answer is a deep copy (JSON round trip)."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.lock = threading.RLock()
        self._subscriptions: dict[str, dict[str, Any]] = {}
        self._sub_seq: dict[str, int] = {}
        self._order: list[str] | None = None  # subscription ids newest first, rebuilt when dirty
        self._customers: dict[str, dict[str, Any]] = {}
        self._events: list[_Event] = []
        self._endpoints: dict[str, dict[str, Any]] = {}  # webhook endpoints, in the order they were added
        self._seq = itertools.count()
        self._faults: deque[Fault] = deque()
        self.latency = 0.0  # seconds added to every answer (to make a sync last long enough to race)
        self.clock_offset = 0.0  # Stripe's clock (the Date header) minus ours
        self.requests: list[tuple[str, str]] = []  # (path, query) of every request, in order
        self.log_requests = True
        self.generated: GeneratedSubscriptions | None = None

    # -- state ------------------------------------------------------------------------------

    def add_customer(self, customer_id: str, email: str | None, **extra: Any) -> dict[str, Any]:
        with self.lock:
            obj = {**synthetic.customer(customer_id=customer_id, email=email), **extra}
            self._customers[customer_id] = obj
            return _copy(obj)

    def put_subscription(self, obj: dict[str, Any]) -> None:
        """Create or replace a subscription (its customer must exist). ``customer`` is stored as an id."""
        with self.lock:
            obj = _copy(obj)
            customer = obj["customer"]
            obj["customer"] = customer["id"] if isinstance(customer, dict) else customer
            if obj["customer"] not in self._customers:
                raise KeyError(f"no customer {obj['customer']}")
            if obj["id"] not in self._subscriptions:
                self._sub_seq[obj["id"]] = next(self._seq)
                self._order = None
            self._subscriptions[obj["id"]] = obj

    def subscription(self, sub_id: str) -> dict[str, Any]:
        with self.lock:
            return _copy(self._subscriptions[sub_id])

    def subscriptions(self) -> list[dict[str, Any]]:
        with self.lock:
            return [_copy(self._subscriptions[i]) for i in self._ordered()]

    def customer(self, customer_id: str) -> dict[str, Any]:
        with self.lock:
            return _copy(self._customers[customer_id])

    def add_event(self, event: dict[str, Any], *, delivered: bool) -> None:
        """Record an event; ``delivered=False`` makes it show up with ``delivery_success=false``."""
        with self.lock:
            self._events.append(_Event(next(self._seq), _copy(event), delivered))
            self._events.sort(key=lambda e: e.key)

    def add_webhook_endpoint(
        self,
        url: str,
        *,
        status: str = "enabled",
        enabled_events: tuple[str, ...] = ("*",),
        api_version: str | None = None,
    ) -> dict[str, Any]:
        """A webhook endpoint of the account, as ``GET /v1/webhook_endpoints`` lists it (newest first)."""
        with self.lock:
            endpoint_id = f"we_{len(self._endpoints) + 1:05d}"
            obj = {
                "id": endpoint_id,
                "object": "webhook_endpoint",
                "url": url,
                "status": status,
                "api_version": api_version,
                "enabled_events": list(enabled_events),
                "created": int(time.time()),
                "livemode": False,
            }
            self._endpoints[endpoint_id] = obj
            return _copy(obj)

    def fail_next(self, status: int, count: int = 1, *, path_prefix: str = "", after: int = 0, **headers: str) -> None:
        """Answer ``count`` requests (to paths starting with ``path_prefix``) with ``status``, once
        ``after`` such requests have been answered normally."""
        with self.lock:
            self._faults.extend(Fault(status, path_prefix, dict(headers), after if i == 0 else 0) for i in range(count))

    def pending_faults(self) -> int:
        with self.lock:
            return len(self._faults)

    def count_requests(self, path_prefix: str) -> int:
        with self.lock:
            return sum(1 for path, _ in self.requests if path.startswith(path_prefix))

    # -- the API ------------------------------------------------------------------------------

    def handle(self, path: str, query: str, authorization: str | None) -> tuple[int, bytes, dict[str, str]]:
        """Answer one GET: (status, JSON body, extra headers)."""
        if self.latency:
            time.sleep(self.latency)
        with self.lock:
            if self.log_requests:
                self.requests.append((path, query))
            fault = self._take_fault(path)
        if fault is not None:
            return fault
        if authorization != f"Bearer {self.api_key}":
            error = {"type": "invalid_request_error", "message": "Invalid API Key provided"}
            return 401, orjson.dumps({"error": error}), {}
        params = _params(query)
        if self.generated is not None and path == "/v1/subscriptions":
            return 200, self.generated.page(params.get("starting_after"), _limit(params)), {}
        try:
            body = self.route(path, params)
        except StripeApiError as exc:
            return exc.status, orjson.dumps({"error": exc.error}), exc.headers
        return 200, orjson.dumps(body), {}

    def route(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        match parts:
            case ["v1", "subscriptions"]:
                return self.list_subscriptions(params)
            case ["v1", "subscriptions", sub_id]:
                return self.retrieve_subscription(sub_id, expand=params.get("expand", []))
            case ["v1", "customers"]:
                return self.list_customers(params)
            case ["v1", "customers", customer_id]:
                return self.retrieve_customer(customer_id)
            case ["v1", "events"]:
                return self.list_events(params)
            case ["v1", "webhook_endpoints"]:
                return self.list_webhook_endpoints(params)
        raise StripeApiError(404, {"type": "invalid_request_error", "message": f"Unrecognized request URL {path}"})

    def list_subscriptions(self, params: dict[str, Any]) -> dict[str, Any]:
        limit = _limit(params)
        status = params.get("status")
        customer = params.get("customer")
        expand = "data.customer" in params.get("expand", [])

        def wanted(sub_id: str) -> bool:
            obj = self._subscriptions[sub_id]
            if customer and obj["customer"] != customer:
                return False
            if status == "all":
                return True
            if status:
                return bool(obj["status"] == status)
            return obj["status"] not in ("canceled", "incomplete_expired")

        with self.lock:
            ids, has_more = _window(self._ordered(), wanted, params, limit, "subscription")
            data = [self._expanded(self._subscriptions[i]) if expand else self._subscriptions[i] for i in ids]
            return _copy({"object": "list", "url": "/v1/subscriptions", "has_more": has_more, "data": data})

    def retrieve_subscription(self, sub_id: str, *, expand: list[str]) -> dict[str, Any]:
        with self.lock:
            obj = self._subscriptions.get(sub_id)
            if obj is None:
                raise _missing("subscription", sub_id)
            return _copy(self._expanded(obj) if "customer" in expand else obj)

    def retrieve_customer(self, customer_id: str) -> dict[str, Any]:
        with self.lock:
            obj = self._customers.get(customer_id)
            if obj is None:
                raise _missing("customer", customer_id)
            return _copy(obj)

    def list_customers(self, params: dict[str, Any]) -> dict[str, Any]:
        limit = _limit(params)
        email = params.get("email")
        with self.lock:
            ordered = sorted(self._customers, key=lambda c: (self._customers[c]["created"], c), reverse=True)
            ids, has_more = _window(
                ordered, lambda c: email is None or self._customers[c]["email"] == email, params, limit, "customer"
            )
            return _copy(
                {
                    "object": "list",
                    "url": "/v1/customers",
                    "has_more": has_more,
                    "data": [self._customers[c] for c in ids],
                }
            )

    def list_events(self, params: dict[str, Any]) -> dict[str, Any]:
        limit = _limit(params)
        if "type" in params and "types" in params:
            raise _bad_param("types", "You may pass either `type` or `types`, but not both.")
        types = params.get("types") or []
        if len(types) > 20:
            raise _bad_param("types", "You may pass at most 20 types.")
        pattern = params.get("type")
        created = params.get("created")
        delivery = params.get("delivery_success")
        now = time.time()

        def wanted(event: _Event) -> bool:
            body = event.body
            if now - body["created"] > 30 * 86400:  # Stripe keeps 30 days of events
                return False
            if types and body["type"] not in types:
                return False
            if pattern and not re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), body["type"]):
                return False
            if delivery is not None and event.delivered != (delivery == "true"):
                return False
            return _created_matches(created, int(body["created"]))

        with self.lock:
            newest_first = list(reversed(self._events))
            by_id = {e.body["id"]: e for e in newest_first if now - e.body["created"] <= 30 * 86400}
            ids, has_more = _window(
                [e.body["id"] for e in newest_first],
                lambda i: i in by_id and wanted(by_id[i]),
                params,
                limit,
                "event",
                known=by_id,
            )
            return _copy(
                {"object": "list", "url": "/v1/events", "has_more": has_more, "data": [by_id[i].body for i in ids]}
            )

    def list_webhook_endpoints(self, params: dict[str, Any]) -> dict[str, Any]:
        limit = _limit(params)
        with self.lock:
            ordered = list(reversed(self._endpoints))  # newest first
            ids, has_more = _window(ordered, lambda _: True, params, limit, "webhook_endpoint")
            data = [self._endpoints[i] for i in ids]
            return _copy({"object": "list", "url": "/v1/webhook_endpoints", "has_more": has_more, "data": data})

    # -- helpers ------------------------------------------------------------------------------

    def _take_fault(self, path: str) -> tuple[int, bytes, dict[str, str]] | None:
        for index, fault in enumerate(self._faults):
            if path.startswith(fault.path_prefix):
                if fault.after > 0:
                    fault.after -= 1
                    return None
                del self._faults[index]
                if fault.status == 429:
                    error = {"type": "invalid_request_error", "code": "rate_limit", "message": "Too many requests"}
                else:
                    error = {"type": "api_error", "message": "An unknown error occurred"}
                return fault.status, orjson.dumps({"error": error}), fault.headers
        return None

    def _ordered(self) -> list[str]:
        if self._order is None:
            self._order = sorted(
                self._subscriptions,
                key=lambda i: (self._subscriptions[i]["created"], self._sub_seq[i]),
                reverse=True,
            )
        return self._order

    def _expanded(self, obj: dict[str, Any]) -> dict[str, Any]:
        customer = self._customers.get(obj["customer"]) if isinstance(obj["customer"], str) else obj["customer"]
        return {**obj, "customer": customer if customer is not None else obj["customer"]}


class GeneratedSubscriptions:
    """``count`` subscriptions made on demand (the benchmark's 100,000 are never all in memory).

    Subscription ``i`` (newest first: ``count - 1`` down to 0) belongs to customer ``i``
    (``user{i:09d}@bench.example``). The objects are padded with the fields real Stripe objects
    have, so that a page weighs what Stripe's does (about 3.7 KB per subscription with its
    customer), and rendered from a JSON template so that the server is never the bottleneck.
    """

    _INDEX = "000000000"
    _CREATED = 1_111_111_111
    _MONTH = 30 * 24 * 3600

    def __init__(self, count: int, *, price_id: str = "price_pro_monthly", created: int = 1_700_000_000) -> None:
        self.count = count
        self.created = created
        customer_id = f"cus_bench{self._INDEX}"
        sub = synthetic.subscription(
            sub_id=f"sub_bench{self._INDEX}",
            customer_id=customer_id,
            price_obj={**synthetic.price(price_id), **_PRICE_PADDING},
            created=self._CREATED,
        )
        sub.update(_SUBSCRIPTION_PADDING)
        sub["customer"] = {
            **synthetic.customer(customer_id=customer_id, email=f"user{self._INDEX}@bench.example", created=created),
            **_CUSTOMER_PADDING,
        }
        # The object's JSON with a %-placeholder where each subscription differs: one formatting
        # per subscription (the server shares the benchmark's two cores with the sync).
        self._template = (
            orjson.dumps(sub)
            .decode()
            .replace("%", "%%")
            .replace(self._INDEX, "%(index)s")
            .replace(str(self._CREATED + self._MONTH), "%(period_end)s")
            .replace(str(self._CREATED), "%(created)s")
        )

    def render(self, index: int) -> str:
        """Subscription ``index`` (customer expanded) as JSON."""
        created = self.created + index
        return self._template % {"index": f"{index:09d}", "period_end": created + self._MONTH, "created": created}

    def subscription(self, index: int) -> dict[str, Any]:
        return dict(orjson.loads(self.render(index)))

    def page(self, starting_after: str | None, limit: int) -> bytes:
        """A ``GET /v1/subscriptions?expand[]=data.customer`` answer."""
        start = self.count - 1 if starting_after is None else int(starting_after.removeprefix("sub_bench")) - 1
        stop = max(-1, start - limit)
        data = ",".join(self.render(i) for i in range(start, stop, -1))
        has_more = "true" if stop > -1 else "false"
        return f'{{"object":"list","url":"/v1/subscriptions","has_more":{has_more},"data":[{data}]}}'.encode()


# Fields a real object carries that a sync does not read: they make a page weigh what Stripe's does.
_PRICE_PADDING: dict[str, Any] = {
    "billing_scheme": "per_unit",
    "created": 1_690_000_000,
    "custom_unit_amount": None,
    "livemode": False,
    "nickname": "Pro monthly",
    "tax_behavior": "unspecified",
    "tiers_mode": None,
    "transform_quantity": None,
    "unit_amount_decimal": "2900",
    "recurring": {
        "aggregate_usage": None,
        "interval": "month",
        "interval_count": 1,
        "meter": None,
        "trial_period_days": None,
        "usage_type": "licensed",
    },
}
_SUBSCRIPTION_PADDING: dict[str, Any] = {
    "application": None,
    "application_fee_percent": None,
    "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
    "billing_cycle_anchor": 1_700_000_000,
    "billing_cycle_anchor_config": None,
    "billing_mode": {"type": "classic"},
    "billing_thresholds": None,
    "cancellation_details": {"comment": None, "feedback": None, "reason": None},
    "currency": "usd",
    "days_until_due": None,
    "default_payment_method": "pm_1QbenchDefaultPaymentMethod00",
    "default_source": None,
    "default_tax_rates": [],
    "description": None,
    "discounts": [],
    "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
    "latest_invoice": "in_1QbenchLatestInvoice00000000",
    "next_pending_invoice_item_invoice": None,
    "on_behalf_of": None,
    "pause_collection": None,
    "payment_settings": {
        "payment_method_options": None,
        "payment_method_types": None,
        "save_default_payment_method": "off",
    },
    "pending_invoice_item_interval": None,
    "pending_setup_intent": None,
    "pending_update": None,
    "schedule": None,
    "test_clock": None,
    "transfer_data": None,
    "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
    "trial_start": None,
}
_CUSTOMER_PADDING: dict[str, Any] = {
    "address": {"city": None, "country": "US", "line1": None, "line2": None, "postal_code": "94107", "state": None},
    "balance": 0,
    "currency": "usd",
    "default_source": None,
    "delinquent": False,
    "description": None,
    "discount": None,
    "invoice_prefix": "A1B2C3D4",
    "invoice_settings": {
        "custom_fields": None,
        "default_payment_method": "pm_1QbenchDefaultPaymentMethod00",
        "footer": None,
        "rendering_options": None,
    },
    "next_invoice_sequence": 2,
    "phone": None,
    "preferred_locales": ["en"],
    "shipping": None,
    "tax_exempt": "none",
    "test_clock": None,
}


def _copy(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


def _limit(params: dict[str, Any]) -> int:
    raw = params.get("limit", "10")
    if not str(raw).isdigit() or not 1 <= int(raw) <= _MAX_LIMIT:
        raise _bad_param("limit", "limit must be an integer between 1 and 100")
    return int(raw)


def _window(
    ordered: list[str],
    wanted: Callable[[str], bool],
    params: dict[str, Any],
    limit: int,
    kind: str,
    *,
    known: dict[str, Any] | None = None,
) -> tuple[list[str], bool]:
    """Stripe's cursor pagination over ``ordered`` (newest first).

    A cursor is a position: it need not match the filters (Stripe's recipe passes the last event
    an endpoint received), but it must exist.
    """
    after, before = params.get("starting_after"), params.get("ending_before")
    if after and before:
        raise _bad_param(
            "ending_before", "You may only specify one of these parameters: starting_after, ending_before."
        )
    positions = {object_id: index for index, object_id in enumerate(ordered)}
    for name, cursor in (("starting_after", after), ("ending_before", before)):
        if cursor and (cursor not in positions or (known is not None and cursor not in known)):
            raise _missing(kind, cursor, param=name)
    if before:
        newer = [i for i in ordered[: positions[before]] if wanted(i)]
        page = newer[-limit:]
        return page, len(newer) > limit
    start = positions[after] + 1 if after else 0
    matching = (i for i in ordered[start:] if wanted(i))
    page = list(itertools.islice(matching, limit + 1))
    return page[:limit], len(page) > limit


def _created_matches(created: Any, value: int) -> bool:
    if created is None:
        return True
    if isinstance(created, str):
        return value == int(created)
    checks = {"gte": value.__ge__, "gt": value.__gt__, "lte": value.__le__, "lt": value.__lt__}
    return all(checks[op](int(bound)) for op, bound in created.items())


def _params(query: str) -> dict[str, Any]:
    """Stripe's form encoding: ``a=1``, ``list[0]=x`` / ``list[]=x``, ``dict[key]=v``."""
    params: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        indexed = _INDEXED.match(key)
        keyed = _KEYED.match(key)
        if indexed:
            params.setdefault(indexed.group(1), []).append(value)
        elif keyed:
            params.setdefault(keyed.group(1), {})[keyed.group(2)] = value
        else:
            params[key] = value
    return params


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header, on the account's clock."""
        moment = time.time() + self.server.account.clock_offset if timestamp is None else timestamp
        return email.utils.formatdate(moment, usegmt=True)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        status, body, headers = self.server.account.handle(url.path, url.query, self.headers.get("Authorization"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Request-Id", f"req_fake{next(self.server.request_ids)}")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read ``FakeStripe.requests`` instead."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, account: FakeStripe) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.account = account
        self.request_ids = itertools.count(1)


class StripeApiServer:
    """``FakeStripe`` served on 127.0.0.1 (an ephemeral port), in a thread."""

    def __init__(self, account: FakeStripe) -> None:
        self.account = account
        self._server = _Server(account)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-stripe", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> StripeApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def serve(account: FakeStripe) -> Iterator[StripeApiServer]:
    server = StripeApiServer(account).start()
    try:
        yield server
    finally:
        server.stop()


class InMemoryGateway:
    """``StripeGateway`` over a ``FakeStripe`` without HTTP: the reconcile layer's unit-test double."""

    def __init__(self, account: FakeStripe, *, clock: Callable[[], float] = time.time) -> None:
        self.account = account
        self.clock = clock
        self.calls: list[str] = []

    def _now(self) -> int:
        return int(self.clock())

    def _call(self, name: str, params: dict[str, Any], path: str = "") -> dict[str, Any]:
        self.calls.append(name)
        try:
            return self.account.route(path, params)
        except StripeApiError as exc:
            if exc.error.get("param") in ("starting_after", "ending_before"):
                raise StripeCursorGone(str(exc)) from None
            raise

    def list_subscriptions(self, *, customer: str | None = None, starting_after: str | None = None) -> Page:
        params: dict[str, Any] = {"status": "all", "limit": "100", "expand": ["data.customer"]}
        if customer:
            params["customer"] = customer
        if starting_after:
            params["starting_after"] = starting_after
        body = self._call("list_subscriptions", params, "/v1/subscriptions")
        return Page(body["data"], body["has_more"], self._now())

    def retrieve_subscription(self, subscription_id: str) -> Fetched | None:
        try:
            body = self._call("retrieve_subscription", {"expand": ["customer"]}, f"/v1/subscriptions/{subscription_id}")
        except StripeApiError:
            return None
        return Fetched(body, self._now())

    def retrieve_customer(self, customer_id: str) -> Fetched | None:
        try:
            body = self._call("retrieve_customer", {}, f"/v1/customers/{customer_id}")
        except StripeApiError:
            return None
        return Fetched(body, self._now())

    def list_customers(self, *, email: str, starting_after: str | None = None) -> Page:
        params: dict[str, Any] = {"email": email, "limit": "100"}
        if starting_after:
            params["starting_after"] = starting_after
        body = self._call("list_customers", params, "/v1/customers")
        return Page(body["data"], body["has_more"], self._now())

    def list_events(
        self,
        query: EventQuery,
        *,
        starting_after: str | None = None,
        ending_before: str | None = None,
        limit: int = 100,
    ) -> Page:
        params: dict[str, Any] = {"limit": str(limit)}
        if query.types:
            params["types"] = list(query.types)
        if query.delivery_success is not None:
            params["delivery_success"] = "true" if query.delivery_success else "false"
        created = {k: str(v) for k, v in (("gte", query.created_gte), ("lt", query.created_lt)) if v is not None}
        if created:
            params["created"] = created
        if starting_after:
            params["starting_after"] = starting_after
        if ending_before:
            params["ending_before"] = ending_before
        body = self._call("list_events", params, "/v1/events")
        return Page(body["data"], body["has_more"], self._now())

    def list_webhook_endpoints(self, *, starting_after: str | None = None) -> Page:
        params: dict[str, Any] = {"limit": "100"}
        if starting_after:
            params["starting_after"] = starting_after
        body = self._call("list_webhook_endpoints", params, "/v1/webhook_endpoints")
        return Page(body["data"], body["has_more"], self._now())
