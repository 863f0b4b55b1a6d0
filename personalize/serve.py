"""``personalize serve``: the HTTP API on-site services call per page view.

It reads Redis only, what the loader materializes there (sinks/redis.py), and answers in
typed JSON (numbers as numbers, lists as lists) instead of the hash's strings:

- ``GET /v1/users/{user_id}``: the profile, with the session in progress as ``session``
  (absent fields: null); 404 for a user Redis holds no profile of (unknown, forgotten, or
  whose latest event withdrew personalization consent: the loader deletes those)
- ``GET /v1/users/{user_id}/recommendations?n=10``: the products trending in the user's
  categories (the session in progress's top category first, then the closed sessions' top
  three), most viewed first, without the products in the user's cart or bought; for a user without
  a profile or categories the global trending products (cold start)
- ``GET /v1/segments`` and ``GET /v1/models``: from the newest model snapshot
- ``GET /v1/interventions/stream?user_id=``: the user's triggers as server-sent events as
  they reach the Redis stream (one reader of the stream for all clients, ``TriggerFeed``);
  ``Last-Event-ID`` (a stream entry id) resumes after a reconnect from the user's index
- ``/healthz`` (the process answers), ``/readyz`` (Redis answers and the loader is at most
  ``api_max_loader_lag`` records behind the job's committed output), ``/metrics``
  (Prometheus: requests by route and status, their latency, stream clients)

Every ``/v1`` route takes ``Authorization: Bearer <token>``, one of ``api_tokens``
(compared in constant time, never logged). Ids are raw: the pseudonym HMAC is applied
under ``PERSONALIZE_PSEUDONYM_KEY``, as the job applies it. uvicorn's access log is off:
its lines would carry the raw ids of the paths.
"""

import asyncio
import hmac
import re
import socket
import time
from collections import defaultdict
from typing import Any

import orjson

from operators import live
from operators.windows import EVENT_TYPES
from personalize import logs
from personalize.errors import PersonalizeError
from personalize.settings import Settings

log = logs.get(__name__)

API_PREFIX = "/v1"
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
MAX_RECOMMENDATIONS = 100
# a client of the interventions stream that falls this many entries behind is closed; it
# resumes with Last-Event-ID, so it misses nothing
STREAM_QUEUE = 1_000
TRENDING_CACHE_S = 1.0  # the global trending list is read again after this long (windows last minutes)
LAG_CACHE_S = 2.0  # /readyz asks Kafka for the topics' ends at most this often

# the profile hash's fields by type (README.md, "Profile hash fields"); anything else
# (a window's extra field) is passed on as the string Redis holds
_INTS = frozenset((
    "version", "n_events", *(f"n_{t}" for t in EVENT_TYPES), "revenue_cents", "first_seen_ms", "last_seen_ms",
    "updated_ms", "recent_events", "recent_product_views", "recent_window_end_ms",
    "session_start_ms", "session_events", "session_product_views", "session_products", "session_last_cart_add_ms",
    "n_sessions", "session_ms_total", "avg_session_ms", "last_session_start_ms", "last_session_events",
    "last_session_cart_adds", "last_session_cart_removes", "last_session_purchases", "propensity_ms",
    "top_category_1_events", "top_category_2_events", "top_category_3_events",
))
_NUMBERS = frozenset(("revenue", "session_cart_value", "last_session_revenue", "propensity", "session_propensity",
                      "avg_session_s"))
_INT_LISTS = frozenset(("events_by_hour", "active_hours"))
_SESSION = "session_"


def _int_list(value: str) -> list[int]:
    return [int(x) for x in value.split(",")] if value else []


def _cart(value: str) -> list[dict]:
    return [{"product_id": line["product_id"], "quantity": int(line["quantity"]), "price": float(line["price"])}
            for line in orjson.loads(value)]


_CONVERT: dict[str, Any] = {
    **dict.fromkeys(_INTS, int), **dict.fromkeys(_NUMBERS, float), **dict.fromkeys(_INT_LISTS, _int_list),
    "purchased_products": lambda value: [str(x) for x in orjson.loads(value)], "session_cart": _cart}


def _typed(name: str, value: str) -> Any:
    convert = _CONVERT.get(name)
    return value if convert is None else convert(value)


_SESSION_SHORT = {name: name[len(_SESSION):] for name in live.SESSION_FIELDS}
_NO_SESSION = dict.fromkeys(_SESSION_SHORT.values())
_UNPARSED = (ValueError, TypeError, KeyError, orjson.JSONDecodeError)


def typed_profile(raw: dict[str, str]) -> dict[str, Any]:
    """A profile hash (field -> string) as typed JSON: numbers as numbers, lists as lists,
    the session in progress as ``session`` (its fields without the prefix; None when no
    session is open). A value that does not parse as its type is passed on as its string."""
    out: dict[str, Any] = {}
    session: dict[str, Any] | None = None
    convert_of = _CONVERT.get
    short_of = _SESSION_SHORT.get
    for name, value in raw.items():  # (per page view: kept to plain lookups)
        convert = convert_of(name)
        if convert is not None:
            try:
                value = convert(value)
            except _UNPARSED:
                pass
        short = short_of(name)
        if short is None:
            out[name] = value
        else:
            if session is None:
                session = dict(_NO_SESSION)
            session[short] = value
    out["session"] = session
    return out


def typed_trigger(fields: dict[str, str]) -> dict[str, Any]:
    """A trigger stream entry (strings, the cart as JSON) as typed JSON."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        try:
            if name.endswith("_ms"):
                out[name] = int(value)
            elif name in ("cart_value", "propensity"):
                out[name] = float(value)
            elif name == "cart":
                out[name] = [{**line, "quantity": int(line["quantity"]), "price": float(line["price"])}
                             for line in orjson.loads(value)]
            else:
                out[name] = value
        except (ValueError, TypeError, KeyError, orjson.JSONDecodeError):
            out[name] = value
    return out


def stream_id(entry_id: str) -> tuple[int, int]:
    """A Redis stream entry id as the pair it is ordered by."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def user_categories(profile: dict[str, Any]) -> list[str]:
    """The categories recommendations draw from, most telling first: the session in
    progress's top category, then the closed sessions' top three."""
    found = []
    session = profile.get("session") or {}
    for name in (session.get("top_category"), *(profile.get(f"top_category_{i}") for i in (1, 2, 3))):
        if isinstance(name, str) and name not in found:
            found.append(name)
    return found


def rank_trending(per_category: dict[str, list[tuple[str, float]]], exclude: set[str], n: int) -> list[dict]:
    """The ``n`` most viewed products over the categories' trending lists (ties: product
    id), each once (under the category it is viewed most in), none of ``exclude``."""
    best: dict[str, tuple[int, str]] = {}
    for category, members in per_category.items():
        for product, views in members:
            if product in exclude:
                continue
            views = int(views)
            held = best.get(product)
            if held is None or (views, held[1]) > (held[0], category):
                best[product] = (views, category)
    ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:n]
    return [{"product_id": product, "category": category, "views": views}
            for product, (views, category) in ranked]


class Subscriber:
    """One client of the interventions stream: its queue, and whether it fell too far behind
    (then its stream ends, and it resumes with Last-Event-ID)."""

    def __init__(self, user: str):
        self.user = user
        self.queue: asyncio.Queue = asyncio.Queue(STREAM_QUEUE)
        self.behind = False


class TriggerFeed:
    """One reader of the trigger stream for every connected client: it follows the stream
    with XREAD BLOCK and hands each entry to the queues of its user's subscribers. It runs
    while somebody subscribes, from the stream's newest entry at the time it starts."""

    def __init__(self, redis, key: str):
        self.redis = redis
        self.key = key
        self.subscribers: dict[str, set[Subscriber]] = defaultdict(set)
        self._task: asyncio.Task | None = None
        self.last_id = "0-0"

    async def subscribe(self, user: str) -> Subscriber:
        """A new subscriber of ``user``'s entries: every entry after the newest one the
        stream holds when this returns reaches it (the caller reads the older ones, by
        the user's index, after this)."""
        subscriber = Subscriber(user)
        if self._task is None or self._task.done():
            newest = await self.redis.xrevrange(self.key, count=1)
            self.last_id = newest[0][0] if newest else "0-0"
            self._task = asyncio.get_running_loop().create_task(self._follow())
        self.subscribers[user].add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        held = self.subscribers.get(subscriber.user)
        if held is not None:
            held.discard(subscriber)
            if not held:
                del self.subscribers[subscriber.user]

    @property
    def clients(self) -> int:
        return sum(len(held) for held in self.subscribers.values())

    async def _follow(self) -> None:
        import redis.exceptions

        while self.subscribers:
            try:
                replies = await self.redis.xread({self.key: self.last_id}, count=500, block=1000)
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("the trigger stream's reader lost Redis; trying again in 1 s", error=type(exc).__name__)
                await asyncio.sleep(1)
                continue
            for _, entries in replies or ():
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    for subscriber in list(self.subscribers.get(fields.get("user_id", ""), ())):
                        try:
                            subscriber.queue.put_nowait((entry_id, fields))
                        except asyncio.QueueFull:
                            subscriber.behind = True
                            self.unsubscribe(subscriber)


class Timed:
    """ASGI middleware: each answer's time into the latency histogram, by route template
    (never the path: it carries user ids), method and status; streams are not timed."""

    def __init__(self, app, histogram):
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            if not path.endswith("/stream"):  # a stream lasts as long as its client stays
                self.histogram.labels(path, scope["method"], str(status[0])).observe(time.perf_counter() - started)


class FastReads:
    """ASGI middleware answering ``GET /v1/users/{id}`` and ``.../recommendations`` itself,
    before FastAPI's routing, dependency solving and exception layers (make bench-serve:
    about twice the requests a second through them); the same answers, token check and
    metrics. Anything else, or a request it would have to refuse for its query, goes on to
    FastAPI, which answers it (with its 422 for a bad ``n``)."""

    def __init__(self, app, tokens, profile, recommendations, histogram, redis_address: str,
                 cors_origins: tuple[str, ...] = ()):
        self.app = app
        self.cors_origins = {o.encode() for o in cors_origins}
        self.tokens = tokens
        self.profile = profile
        self.recommendations = recommendations
        self.histogram = histogram
        self.redis_address = redis_address

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].startswith(API_PREFIX + "/users/"):
            return await self.app(scope, receive, send)
        rest = scope["path"][len(API_PREFIX + "/users/"):]
        if rest and "/" not in rest:
            route, answer = API_PREFIX + "/users/{user_id}", lambda: self.profile(rest)
        elif rest.endswith("/recommendations") and rest[:-16] and "/" not in rest[:-16]:
            n = _query_n(scope["query_string"])
            if n is None:
                return await self.app(scope, receive, send)
            user = rest[:-16]
            route, answer = API_PREFIX + "/users/{user_id}/recommendations", lambda: self.recommendations(user, n)
        else:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = [(b"content-type", b"application/json")]
        if not _bearer_matches(scope["headers"], self.tokens):
            status, body = 401, {"detail": "a bearer token of PERSONALIZE_API_TOKENS is required"}
            headers.append((b"www-authenticate", b'Bearer realm="personalize"'))
        else:
            import redis.exceptions

            try:
                status, body = await answer()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                status, body = 503, {"detail": f"Redis does not answer at {self.redis_address}"}
        payload = orjson.dumps(body)
        headers.append((b"content-length", str(len(payload)).encode()))
        if self.cors_origins:  # as Starlette's CORSMiddleware answers a simple request
            origin = next((v for k, v in scope["headers"] if k == b"origin"), None)
            if origin is not None and (origin in self.cors_origins or b"*" in self.cors_origins):
                headers += [(b"access-control-allow-origin", b"*" if b"*" in self.cors_origins else origin),
                            (b"vary", b"Origin")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        self.histogram.labels(route, "GET", str(status)).observe(time.perf_counter() - started)


def _query_n(query: bytes) -> int | None:
    """``n`` of a recommendations query (default 10), or None when it is not 1..MAX."""
    if not query:
        return 10
    from urllib.parse import parse_qsl

    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    given = [v for k, v in pairs if k == "n"]
    if not given:
        return 10
    if len(given) > 1 or not given[0].isdigit() or not 1 <= int(given[0]) <= MAX_RECOMMENDATIONS:
        return None
    return int(given[0])


def _bearer_matches(headers, tokens: list[bytes]) -> bool:
    """Whether the Authorization header carries one of ``tokens`` (each compared in constant time)."""
    given = b""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credential = value.partition(b" ")
            if scheme.lower() == b"bearer":
                given = credential.strip()
            break
    return _token_matches(given, tokens)


def _token_matches(given: bytes, tokens: list[bytes]) -> bool:
    """Whether ``given`` is one of ``tokens``: every token compared, each in constant time, so
    neither the match nor which one shows in the time taken."""
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token)
    return matched and bool(given)


def create_app(settings: Settings):
    """The ASGI application (FastAPI behind ``FastReads``), reading Redis at ``settings.redis_url``."""
    import redis.asyncio as aioredis
    import redis.exceptions
    from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, Field
    from sse_starlette.sse import EventSourceResponse

    from sinks import redis as loader

    tokens = [t.encode() for t in settings.api_token_list]
    from personalize.credentials import redis_options

    options = redis_options(settings, decode_responses=True, socket_connect_timeout=2, socket_timeout=5,
                            health_check_interval=30)
    db = aioredis.Redis.from_url(settings.redis_url, **options)
    # the stream's reader blocks a connection of its own
    feed = TriggerFeed(aioredis.Redis.from_url(settings.redis_url, **{**options, "socket_timeout": None}),
                       loader.TRIGGER_STREAM)

    registry = CollectorRegistry()
    latency = Histogram("personalize_api_request_seconds", "time to answer a request, by route and status",
                        ["route", "method", "status"], registry=registry,
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
    Gauge("personalize_api_stream_clients", "clients following the interventions stream",
          registry=registry).set_function(lambda: feed.clients)
    lag_gauge = Gauge("personalize_api_loader_lag_records",
                      "records of the job's committed output the Redis loader has not applied (at the last /readyz)",
                      registry=registry)

    class Profile(BaseModel):
        """A user's profile (README.md, "Profile hash fields"), typed; a window's extra field is a string."""
        model_config = {"extra": "allow"}
        user_id: str = Field(description="the id asked for (raw)")
        version: int | None = None
        n_events: int | None = None
        revenue: float | None = None
        first_seen_ms: int | None = None
        last_seen_ms: int | None = None
        updated_ms: int | None = None
        events_by_hour: list[int] | None = None
        active_hours: list[int] | None = None
        n_sessions: int | None = None
        propensity: float | None = Field(None, description="score of the newest closed session before its outcome")
        segment: str | None = None
        segment_name: str | None = None
        session: dict[str, Any] | None = Field(
            None, description="the session in progress: start_ms, events, product_views, products, "
                              "cart (lines of product_id, quantity, price), cart_value, last_cart_add_ms, "
                              "top_category, propensity (the newest model's score of the session so far)")

    class Recommendation(BaseModel):
        product_id: str
        category: str
        views: int = Field(description="views in the newest trending window of its category")

    class Recommendations(BaseModel):
        user_id: str
        source: str = Field(description="'personalized' (the user's categories) or 'trending' (cold start)")
        categories: list[str]
        items: list[Recommendation]

    bearer = HTTPBearer(auto_error=False, description="one of PERSONALIZE_API_TOKENS")

    # async: FastAPI runs a plain function dependency in its thread pool, a thread handoff per request
    async def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not _token_matches(credentials.credentials.encode() if credentials is not None else b"", tokens):
            raise HTTPException(401, "a bearer token of PERSONALIZE_API_TOKENS is required",
                                headers={"WWW-Authenticate": 'Bearer realm="personalize"'})

    app = FastAPI(title="personalize", version="1",
                  description="Live profiles, recommendations, segments and interventions from the "
                              "personalization pipeline's Redis (README.md, \"The HTTP API\").")
    if settings.api_cors_origin_list:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.api_cors_origin_list),
                           allow_methods=["GET"], allow_headers=["Authorization", "Last-Event-ID"])

    app.add_middleware(Timed, histogram=latency)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def redis_down(request: Request, exc: Exception):
        return JSONResponse({"detail": f"Redis does not answer at {settings.redis_address}"}, status_code=503)

    def json(content: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(content), status_code=status, media_type="application/json")

    v1 = [Depends(authorized)]

    async def profile_answer(user_id: str) -> tuple[int, dict]:
        raw = await db.hgetall(loader.PROFILE_PREFIX + settings.user_key(user_id))
        if not raw:
            return 404, {"detail": "no profile of this user (unknown, forgotten, or without personalization consent)"}
        return 200, {"user_id": user_id, **typed_profile(raw)}

    trending_cache: dict[str, Any] = {"at": -1.0, "per_category": {}}

    async def global_trending() -> dict[str, list[tuple[str, float]]]:
        now = time.monotonic()
        if now - trending_cache["at"] > TRENDING_CACHE_S:
            categories = await db.hkeys(loader.TRENDING_WINDOWS)
            pipe = db.pipeline(transaction=False)
            for category in categories:
                pipe.zrevrange(loader.TRENDING_PREFIX + (category or "(none)"), 0, MAX_RECOMMENDATIONS - 1,
                               withscores=True)
            lists = await pipe.execute() if categories else []
            trending_cache.update(at=now, per_category=dict(zip(categories, lists)))
        return trending_cache["per_category"]

    async def recommendations_answer(user_id: str, n: int) -> tuple[int, dict]:
        raw = await db.hgetall(loader.PROFILE_PREFIX + settings.user_key(user_id))
        profile = typed_profile(raw) if raw else {}
        categories = user_categories(profile)
        cart = (profile.get("session") or {}).get("cart") or []
        bought = profile.get("purchased_products")
        exclude = {line["product_id"] for line in cart if isinstance(line, dict)} | set(
            bought if isinstance(bought, list) else ())
        items: list[dict] = []
        if categories:
            pipe = db.pipeline(transaction=False)
            for category in categories:
                pipe.zrevrange(loader.TRENDING_PREFIX + category, 0, n + len(exclude) - 1, withscores=True)
            items = rank_trending(dict(zip(categories, await pipe.execute())), exclude, n)
        source = "personalized" if items else "trending"
        if len(items) < n:  # too few in the user's categories: the global trending ones fill up
            seen = exclude | {i["product_id"] for i in items}
            items += rank_trending(await global_trending(), seen, n - len(items))
        return 200, {"user_id": user_id, "source": source, "categories": categories, "items": items}

    # the two routes a page view calls are answered by ``FastReads`` in front of FastAPI (its
    # dependency solving and exception layers cost several times the answer here); these
    # declarations document them in the OpenAPI schema and answer what it hands on
    @app.get(API_PREFIX + "/users/{user_id}", dependencies=v1, response_model=None,
             responses={200: {"model": Profile}, 401: {}, 404: {"description": "no profile of this user"}})
    async def profile(user_id: str) -> Response:
        """The user's profile, typed, with the session in progress."""
        return json(*reversed(await profile_answer(user_id)))

    @app.get(API_PREFIX + "/users/{user_id}/recommendations", dependencies=v1, response_model=Recommendations)
    async def recommendations(user_id: str, n: int = Query(10, ge=1, le=MAX_RECOMMENDATIONS)) -> Response:
        """Products trending in the user's categories, without those in the user's cart or bought; the
        global trending products for a user without a profile or categories (cold start)."""
        return json(*reversed(await recommendations_answer(user_id, n)))

    async def snapshot() -> dict:
        raw = await db.get(loader.MODELS_KEY)
        if raw is None:
            raise HTTPException(404, "no model snapshot yet: the job has closed no session")
        return orjson.loads(raw)

    @app.get(API_PREFIX + "/segments", dependencies=v1)
    async def segments() -> Response:
        """The segments of the newest model snapshot: id, name, users, share, centroid (standard units)."""
        s = await snapshot()
        return json({"model_version": s.get("model_version"), "updated_ms": s.get("updated_ms"),
                     "silhouette_sampled": s.get("segment_silhouette_sampled"),
                     "segments": [{"id": sid, **seg} for sid, seg in (s.get("segments") or {}).items()]})

    @app.get(API_PREFIX + "/models", dependencies=v1)
    async def models() -> Response:
        """The newest model snapshot, as ``personalize models`` prints it."""
        return json(await snapshot())

    @app.get(API_PREFIX + "/interventions/stream", dependencies=v1,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "server-sent events: id = the stream entry id, event = the "
                                             "trigger's kind, data = the trigger as JSON"}})
    async def interventions(request: Request, user_id: str = Query(..., min_length=1),
                            last_event_id: str | None = Header(None, alias="Last-Event-ID")):
        """The user's triggers as they reach Redis; ``Last-Event-ID`` resumes after that entry."""
        if last_event_id is not None and not STREAM_ID.fullmatch(last_event_id.strip()):
            raise HTTPException(400, "Last-Event-ID must be a stream entry id such as 1733580000000-0")
        user = settings.user_key(user_id)
        subscriber = await feed.subscribe(user)  # before the catch-up: nothing written meanwhile is missed

        async def events():
            sent = stream_id(last_event_id.strip()) if last_event_id else None
            try:
                if sent is not None:
                    ids = sorted((i for i in await db.hkeys(loader.TRIGGERS_BY_USER + user)
                                  if stream_id(i) > sent), key=stream_id)
                    if ids:
                        pipe = db.pipeline(transaction=False)
                        for entry_id in ids:
                            pipe.xrange(loader.TRIGGER_STREAM, entry_id, entry_id)
                        for found in await pipe.execute():
                            for entry_id, fields in found:
                                sent = stream_id(entry_id)
                                yield _event(entry_id, fields)
                while not subscriber.behind:  # one that fell too far behind is closed: it resumes by its id
                    try:
                        entry_id, fields = await asyncio.wait_for(subscriber.queue.get(), timeout=1)
                    except asyncio.TimeoutError:
                        continue
                    if sent is not None and stream_id(entry_id) <= sent:
                        continue
                    sent = stream_id(entry_id)
                    yield _event(entry_id, fields)
            finally:
                feed.unsubscribe(subscriber)

        return EventSourceResponse(events(), ping=15)

    def _event(entry_id: str, fields: dict) -> dict:
        return {"id": entry_id, "event": fields.get("kind", "trigger"),
                "data": orjson.dumps(typed_trigger(fields)).decode()}

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return json({"status": "ok"})

    lag_cache: dict[str, Any] = {"at": -LAG_CACHE_S - 1, "lag": None, "error": None}

    lag_lock = asyncio.Lock()

    async def measure_lag() -> None:
        try:
            offsets = await db.hgetall(loader.OFFSETS_KEY)
            lag = await asyncio.to_thread(loader.loader_lag, settings, offsets)
            lag_cache.update(lag=lag, error=None)
            lag_gauge.set(lag)
        except Exception as exc:  # noqa: BLE001 - any failure to measure is a reason not to be ready
            lag_cache.update(lag=None, error=settings.redact(str(exc)))
        lag_cache["at"] = time.monotonic()

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        try:
            await db.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            return json({"status": "not ready", "reason": f"Redis does not answer at {settings.redis_address} "
                                                          f"({type(exc).__name__})"}, 503)
        if not settings.api_max_loader_lag:
            return json({"status": "ready"})
        async with lag_lock:  # one measurement at a time; the others take its figure
            if time.monotonic() - lag_cache["at"] > LAG_CACHE_S:
                await measure_lag()
        if lag_cache["error"] is not None:
            return json({"status": "not ready", "reason": lag_cache["error"]}, 503)
        if lag_cache["lag"] > settings.api_max_loader_lag:
            return json({"status": "not ready", "loader_lag": lag_cache["lag"],
                         "reason": f"the Redis loader is {lag_cache['lag']} records behind "
                                   f"(PERSONALIZE_API_MAX_LOADER_LAG {settings.api_max_loader_lag})"}, 503)
        return json({"status": "ready", "loader_lag": lag_cache["lag"]})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.feed = feed
    # outermost, in front of FastAPI's own error layers too: a page view's read passes nothing else
    return FastReads(app, tokens=tokens, profile=profile_answer, recommendations=recommendations_answer,
                     histogram=latency, redis_address=settings.redis_address,
                     cors_origins=settings.api_cors_origin_list)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or one line naming the address when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PersonalizeError(f"cannot listen on {host}:{port} ({exc.strerror}): set PERSONALIZE_API_PORT "
                               "(or --port) to a free port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, on_ready=None) -> None:
    """Run the API until Ctrl-C or SIGTERM."""
    import redis as redis_lib
    import uvicorn

    from personalize import credentials
    from personalize.errors import ConfigError

    if not settings.api_token_list:
        raise ConfigError("PERSONALIZE_API_TOKENS is not set: every /v1 route requires a bearer token (set one or "
                          "more random tokens of at least 16 characters, comma-separated)")
    sock = bind(settings.api_host, settings.api_port)
    try:
        credentials.redis_client(settings, socket_connect_timeout=2).ping()
    except redis_lib.RedisError as exc:  # served anyway: /readyz says so, and the routes answer 503
        log.warning("Redis does not answer: the API answers 503 until it does",
                    redis=settings.redis_address, error=type(exc).__name__)
    app = create_app(settings)
    config = uvicorn.Config(app, log_config=None, access_log=False, server_header=False,
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    host = f"[{settings.api_host}]" if ":" in settings.api_host else settings.api_host
    print(f"personalize serve: http://{host}:{settings.api_port} (OpenAPI: /docs, /openapi.json)", flush=True)
    if on_ready is not None:
        on_ready()
    server.run(sockets=[sock])
