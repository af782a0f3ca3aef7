"""Stripe's API behind one narrow interface: the few reads that reconcile needs, as plain dicts.

``StripeGateway`` is the interface; ``StripeApiGateway`` implements it over the official
``stripe`` library (``STRIPE_API_BASE`` points it at another server, as the tests do), and the
tests have an in-memory one. Each method is one API request: pagination, retries and the rate
budget are decided here once, and the callers never see the SDK.

Every answer carries ``read_at``: the time of the read on Stripe's clock (the response's
``Date`` header), the clock that stamps events' ``created``. A snapshot read from the API is
versioned with it (see ``read_version``), so that our clock's skew cannot reorder it against
webhook snapshots.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import orjson

from kamiyo.errors import StripeApiError, StripeCursorGone
from kamiyo.reconcile.ratelimit import RateBudget
from kamiyo.reconcile.retry import RetryPolicy

if TYPE_CHECKING:
    from kamiyo.config import Settings  # not at run time: a reader process must not import SQLAlchemy

log = logging.getLogger("kamiyo.stripe")
PAGE_LIMIT = 100  # Stripe's maximum page size


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list, newest first as Stripe sends it."""

    data: list[dict[str, Any]]
    has_more: bool
    read_at: int


@dataclass(frozen=True, slots=True)
class Fetched:
    """One object as the API returned it."""

    obj: dict[str, Any]
    read_at: int


@dataclass(frozen=True)
class GatewayConfig:
    """What builds a ``StripeApiGateway`` (in another process: a sync's reader)."""

    secret_key: str = field(repr=False)
    api_base: str
    rate: float
    retry: RetryPolicy
    timeout: float


@dataclass(frozen=True, slots=True)
class EventQuery:
    """The filters of ``GET /v1/events`` that a backfill uses."""

    types: tuple[str, ...] = ()
    delivery_success: bool | None = None
    created_gte: int | None = None
    created_lt: int | None = None


class StripeGateway(Protocol):
    """The Stripe API calls kamiyo makes. Each is one request; failures raise ``StripeApiError``."""

    def list_subscriptions(self, *, customer: str | None = None, starting_after: str | None = None) -> Page:
        """Subscriptions of every status (``status=all``), each with its customer expanded."""
        ...

    def retrieve_subscription(self, subscription_id: str) -> Fetched | None:
        """One subscription with its customer expanded; None when Stripe has no such subscription."""
        ...

    def retrieve_customer(self, customer_id: str) -> Fetched | None:
        """One customer; None when Stripe has no such customer."""
        ...

    def list_customers(self, *, email: str, starting_after: str | None = None) -> Page:
        """Customers whose email is exactly ``email``."""
        ...

    def list_events(
        self,
        query: EventQuery,
        *,
        starting_after: str | None = None,
        ending_before: str | None = None,
        limit: int = PAGE_LIMIT,
    ) -> Page:
        """Events (the last 30 days), newest first. An unknown cursor raises ``StripeCursorGone``."""
        ...

    def list_webhook_endpoints(self, *, starting_after: str | None = None) -> Page:
        """The account's webhook endpoints (``kamiyo doctor``'s Step 4: status, URL, events)."""
        ...


def read_version_created(read_at: int) -> int:
    """The ``created`` a snapshot read from the API at ``read_at`` is versioned with.

    ``created`` has one-second resolution: an event stamped with the read's own second may
    describe a change made just before or just after the read. The read therefore ranks as
    the end of the previous second: newer than every event of an earlier second, never newer
    than one of its own. (A webhook snapshot of the same second that is in fact older is
    harmless: the API's state of that second is what the newest such event says.)
    """
    return read_at - 1


class StripeApiGateway:
    """``StripeGateway`` over the official ``stripe`` library.

    The library's own retries are off (``max_network_retries=0``): it would retry a 5xx but never
    a plain 429, so every retry is decided here, by one policy, inside the rate budget.
    Answers are plain JSON dicts, never the library's typed ``StripeObject``s: building those
    would cost more than everything else a sync does per subscription (see ``_request``).
    """

    def __init__(
        self,
        secret_key: str,
        api_base: str,
        *,
        budget: RateBudget,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import stripe  # a large import: only when the API is used

        self._stripe = stripe
        self._client = stripe.StripeClient(
            secret_key,
            base_addresses={"api": api_base},
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout),
        )
        self._budget = budget
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._config = GatewayConfig(secret_key, api_base, budget.rate, self._retry, timeout)

    def config(self) -> GatewayConfig:
        return self._config

    @classmethod
    def from_config(cls, config: GatewayConfig) -> StripeApiGateway:
        return cls(
            config.secret_key,
            config.api_base,
            budget=shared_budget(config.rate),
            retry=config.retry,
            timeout=config.timeout,
        )

    # -- the interface ---------------------------------------------------------------------

    def list_subscriptions(self, *, customer: str | None = None, starting_after: str | None = None) -> Page:
        params: dict[str, Any] = {"status": "all", "limit": PAGE_LIMIT, "expand": ["data.customer"]}
        if customer:
            params["customer"] = customer
        if starting_after:
            params["starting_after"] = starting_after
        return self._page("/v1/subscriptions", params)

    def retrieve_subscription(self, subscription_id: str) -> Fetched | None:
        return self._one(f"/v1/subscriptions/{quote(subscription_id, safe='')}", {"expand": ["customer"]})

    def retrieve_customer(self, customer_id: str) -> Fetched | None:
        return self._one(f"/v1/customers/{quote(customer_id, safe='')}", {})

    def list_customers(self, *, email: str, starting_after: str | None = None) -> Page:
        params: dict[str, Any] = {"email": email, "limit": PAGE_LIMIT}
        if starting_after:
            params["starting_after"] = starting_after
        return self._page("/v1/customers", params)

    def list_events(
        self,
        query: EventQuery,
        *,
        starting_after: str | None = None,
        ending_before: str | None = None,
        limit: int = PAGE_LIMIT,
    ) -> Page:
        params: dict[str, Any] = {"limit": limit}
        if query.types:
            params["types"] = list(query.types)
        if query.delivery_success is not None:
            params["delivery_success"] = query.delivery_success
        created = {
            key: value for key, value in (("gte", query.created_gte), ("lt", query.created_lt)) if value is not None
        }
        if created:
            params["created"] = created
        if starting_after:
            params["starting_after"] = starting_after
        if ending_before:
            params["ending_before"] = ending_before
        return self._page("/v1/events", params)

    def list_webhook_endpoints(self, *, starting_after: str | None = None) -> Page:
        params: dict[str, Any] = {"limit": PAGE_LIMIT}
        if starting_after:
            params["starting_after"] = starting_after
        return self._page("/v1/webhook_endpoints", params)

    # -- one request -----------------------------------------------------------------------

    def _page(self, path: str, params: dict[str, Any]) -> Page:
        body, read_at = self._get(path, params, missing_is_none=False)
        assert body is not None  # _get returns None only with missing_is_none
        data = body.get("data")
        if not isinstance(data, list):
            raise StripeApiError(f"GET {path}: the answer is not a list")
        return Page(data=data, has_more=bool(body.get("has_more")), read_at=read_at)

    def _one(self, path: str, params: dict[str, Any]) -> Fetched | None:
        body, read_at = self._get(path, params, missing_is_none=True)
        return None if body is None else Fetched(body, read_at)

    def _get(self, path: str, params: Mapping[str, Any], *, missing_is_none: bool) -> tuple[dict[str, Any] | None, int]:
        """GET ``path``; retry 429, 409, 5xx and network errors; map the rest to ``StripeApiError``."""
        stripe = self._stripe
        failures = 0
        while True:
            self._budget.acquire()
            try:
                body, headers = self._request(path, params)
            except (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError) as exc:
                status = exc.http_status
                if isinstance(exc, stripe.APIError) and status is not None and status < 500 and status != 409:
                    raise StripeApiError(f"GET {path}: {_describe(exc)}") from None
                failures += 1
                if failures >= self._retry.attempts:
                    raise StripeApiError(
                        f"GET {path}: still failing after {failures} attempts: {_describe(exc)}"
                    ) from None
                delay = self._retry.delay(failures, retry_after=_retry_after(exc.headers))
                log.warning(
                    "stripe GET %s failed (%s); retry %d/%d in %.2fs",
                    path,
                    _describe(exc),
                    failures,
                    self._retry.attempts - 1,
                    delay,
                )
                self._sleep(delay)
                continue
            except stripe.InvalidRequestError as exc:
                if exc.code == "resource_missing" and exc.param in ("starting_after", "ending_before"):
                    raise StripeCursorGone(f"GET {path}: {exc.param} names an object Stripe does not have") from None
                if exc.code == "resource_missing" and missing_is_none:
                    return None, int(time.time())
                raise StripeApiError(f"GET {path}: {_describe(exc)}") from None
            except stripe.AuthenticationError:
                raise StripeApiError(
                    "Stripe refused STRIPE_SECRET_KEY (401): check the key (and test/live mode) in the Dashboard"
                ) from None
            except stripe.PermissionError:
                raise StripeApiError(
                    f"GET {path}: the key lacks a permission (403); a restricted key needs read access to "
                    "subscriptions, customers and events"
                ) from None
            except stripe.StripeError as exc:
                raise StripeApiError(f"GET {path}: {_describe(exc)}") from None
            if not isinstance(body, dict):
                raise StripeApiError(f"GET {path}: the answer is not a JSON object")
            return body, _read_at(headers)

    def _request(self, path: str, params: Mapping[str, Any]) -> tuple[Any, Mapping[str, str]]:
        """One GET through the library: its HTTP client, authentication, API version and errors.

        The success body is parsed with orjson rather than by the library's ``StripeResponse``
        (``json.loads`` into ``OrderedDict``s), several times faster. Errors still go through the
        library's own interpretation, so they are its typed exceptions. Without the requestor
        (another library version): ``raw_request``.
        """
        requestor = getattr(self._client, "_requestor", None)
        if requestor is None or not hasattr(requestor, "request_raw") or not hasattr(requestor, "_interpret_response"):
            response = self._client.raw_request("get", path, **params)
            return response.data, response.headers
        content, status, headers = requestor.request_raw(
            "get", path, params=dict(params), base_address="api", api_mode="V1", usage=["raw_request"]
        )
        if 200 <= status < 300:
            try:
                return orjson.loads(content), headers
            except orjson.JSONDecodeError:
                raise StripeApiError(f"GET {path}: the answer is not JSON (HTTP {status})") from None
        requestor._interpret_response(content, status, headers, "V1")  # raises the library's typed error
        raise StripeApiError(f"GET {path}: HTTP {status}")


def _describe(exc: Any) -> str:
    """Status, type and Stripe's message; Stripe masks keys in its messages, and 401s are not described."""
    status = getattr(exc, "http_status", None)
    code = getattr(exc, "code", None)
    message = str(getattr(exc, "user_message", None) or getattr(exc, "_message", None) or exc.__class__.__name__)
    parts = [str(status) if status else "no answer", exc.__class__.__name__]
    if code:
        parts.append(str(code))
    return " ".join(parts) + f": {message[:200]}"


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    raw = (headers or {}).get("Retry-After") or (headers or {}).get("retry-after")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _read_at(headers: Mapping[str, str]) -> int:
    """Stripe's clock at the read (the ``Date`` header), or ours when the header is missing or odd."""
    raw = headers.get("Date") or headers.get("date")
    if raw:
        try:
            return int(parsedate_to_datetime(raw).timestamp())
        except (TypeError, ValueError, IndexError):
            pass
    return int(time.time())


def gateway_from_settings(settings: Settings, *, retry: RetryPolicy | None = None) -> StripeApiGateway | None:
    """The real gateway when ``STRIPE_SECRET_KEY`` is set, else None (every API feature off)."""
    if not settings.stripe_secret_key:
        return None
    return StripeApiGateway(
        settings.stripe_secret_key,
        settings.stripe_api_base,
        budget=shared_budget(settings.stripe_rate_limit),
        retry=retry,
    )


_budgets: dict[float, RateBudget] = {}
_budgets_lock = threading.Lock()


def shared_budget(rate: float) -> RateBudget:
    """The process's one budget for ``rate``: every gateway built from the settings shares it."""
    with _budgets_lock:
        if rate not in _budgets:
            _budgets[rate] = RateBudget(rate)
        return _budgets[rate]
