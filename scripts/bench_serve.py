"""The HTTP API's speed (a benchmark, not a test): `make bench-serve`.

Loads ``--users`` profiles (100,000) into a Redis server of its own, on loopback (the
fields and sizes a profile of the job has: counts, hours, the closed sessions' fields,
propensity and segment; a session in progress with a cart for half of them) and a trending
list per category, starts ``personalize serve`` (one process), and drives it with wrk
(Debian's package; `make bench-serve` installs it) from the same machine, each request for a
random user:

- profile reads (``GET /v1/users/{id}``) and recommendations (``.../recommendations?n=10``):
  the most wrk gets with ``--connections`` open (closed loop), then paced runs at ``--rate``
  requests/s and at half the most (each connection waits between its requests so that
  together they offer that rate): requests/s achieved, p50 and p99;
- the ceiling: raw ``HGETALL`` of the same keys with redis-benchmark, same machine.

The goal (issue "Serving on-site"): p99 at most 5 ms at 5,000 profile reads/s on this 2-core
machine, where wrk, the API and Redis share the two cores.

Usage: python scripts/bench_serve.py [--users N] [--seconds S] [--rate R] [--connections C]
"""

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CATEGORIES = 50
EVENT_TYPES = ("page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout", "purchase", "search")
# a random bench user per request, in redis-benchmark's __rand_int__ form (12 digits)
WRK_SCRIPT = """
local users = tonumber(os.getenv("BENCH_USERS"))
local path = os.getenv("BENCH_PATH")
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local auth = "Bearer " .. os.getenv("BENCH_TOKEN")
function setup(thread) thread:set("seed", math.random(1, 1000000)) end
function init(args) math.randomseed(seed) end
function request()
  local id = string.format("%012d", math.random(0, users - 1))
  return wrk.format("GET", string.format(path, id), {["Authorization"] = auth})
end
if pause > 0 then function delay() return pause end end
"""


def profile(rng: random.Random, n: int) -> dict[str, str]:
    """A profile hash as the job writes it (README.md, "Profile hash fields")."""
    counts = {t: rng.randint(0, 40) for t in EVENT_TYPES}
    first = 1_569_888_000_000 + rng.randint(0, 30 * 86_400_000)
    last = first + rng.randint(0, 86_400_000)
    hours = [rng.randint(0, 9) if rng.random() < 0.3 else 0 for _ in range(24)]
    revenue = rng.randint(0, 500_000)
    cats = rng.sample(range(CATEGORIES), 3)
    p = {"version": str(last * 10_000 + 1), "n_events": str(sum(counts.values())),
         **{f"n_{t}": str(c) for t, c in counts.items()}, "revenue_cents": str(revenue),
         "revenue": f"{revenue // 100}.{revenue % 100:02d}", "first_seen_ms": str(first), "last_seen_ms": str(last),
         "updated_ms": str(last), "events_by_hour": ",".join(map(str, hours)),
         "active_hours": ",".join(str(h) for h in sorted(range(24), key=lambda h: -hours[h])[:3] if hours[h]),
         "recent_events": str(rng.randint(0, 20)), "recent_product_views": str(rng.randint(0, 10)),
         "recent_window_end_ms": str(last - last % 300_000 + 300_000), "n_sessions": str(rng.randint(1, 9)),
         "session_ms_total": "3600000", "avg_session_ms": "720000", "avg_session_s": "720.000",
         "last_session_start_ms": str(last - 600_000), "last_session_events": "12", "last_session_cart_adds": "2",
         "last_session_cart_removes": "0", "last_session_purchases": "1", "last_session_revenue": "45.90",
         "propensity": f"{rng.random():.6f}", "propensity_ms": str(last + 1_800_000),
         "segment": f"s{rng.randint(0, 4)}", "segment_name": "frequent night browsers"}
    for rank, c in enumerate(cats, start=1):
        p[f"top_category_{rank}"], p[f"top_category_{rank}_events"] = f"category-{c}", str(10 - rank)
    if n % 2:  # a session in progress, with a cart
        lines = [{"product_id": f"product-{rng.randint(0, 999)}", "quantity": rng.randint(1, 3),
                  "price": f"{rng.randint(100, 9999) / 100:.2f}"} for _ in range(rng.randint(1, 3))]
        p.update(session_start_ms=str(last - 300_000), session_events="7", session_product_views="4",
                 session_products=str(len(lines) + 2), session_cart=orjson.dumps(lines).decode(),
                 session_cart_value="42.00", session_last_cart_add_ms=str(last - 60_000),
                 session_top_category=f"category-{cats[0]}", session_propensity=f"{rng.random():.6f}")
    return p


def load(client, users: int) -> None:
    rng = random.Random(7)
    client.flushdb()
    pipe = client.pipeline(transaction=False)
    for n in range(users):
        pipe.hset(f"profile:{n:012d}", mapping=profile(rng, n))
        if n % 5_000 == 4_999:
            pipe.execute()
    for c in range(CATEGORIES):
        pipe.zadd(f"trending:category-{c}", {f"product-{rng.randint(0, 999)}": rng.randint(1, 90) for _ in range(10)})
        pipe.hset("personalize:trending:window_end_ms", f"category-{c}", 1_569_888_300_000)
    pipe.execute()


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(port: int, path: str, users: int, seconds: int, connections: int, token: str, delay_ms: int = 0) -> dict:
    """One wrk run: requests/s, p50, p99 (ms), and the count of answers that were not 200."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    env = {**os.environ, "BENCH_USERS": str(users), "BENCH_PATH": path, "BENCH_TOKEN": token,
           "BENCH_DELAY_MS": str(delay_ms)}
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", f.name,
                          f"http://127.0.0.1:{port}"], env=env, capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    dist = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)$", out, re.M)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": _ms(dist["50"]),
            "p99": _ms(dist["99"]), "bad": int(bad.group(1)) if bad else 0, "errors": errors.group(1) if errors else ""}


def paced(port: int, path: str, users: int, seconds: int, rate: int, token: str, p50_ms: float) -> dict:
    """wrk offering about ``rate`` requests/s: 50 connections, each waiting between requests
    so that 50 x 1000 / (wait + answer time) = rate; the wait corrected once by the rate achieved."""
    connections = 50
    delay = max(1, round(connections * 1000 / rate - p50_ms))
    got = wrk(port, path, users, seconds, connections, token, delay)
    if abs(got["rps"] - rate) > 0.04 * rate:
        delay = max(1, round(delay * got["rps"] / rate))
        got = wrk(port, path, users, seconds, connections, token, delay)
    return got


def redis_ceiling(port: int, users: int) -> dict:
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-n", "200000", "-c", "32", "-r", str(users),
                          "--csv", "HGETALL", "profile:__rand_int__"],
                         capture_output=True, text=True).stdout
    row = [line for line in out.splitlines() if line.startswith('"HGETALL')][-1]
    values = [v.strip('"') for v in row.split(",")]
    return {"rps": float(values[1]), "p50": float(values[4]), "p99": float(values[6])}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_serve", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench_serve: wrk is missing: `make bench-serve` installs it (Debian's package wrk)", file=sys.stderr)
        return 2

    import redis

    from personalize.flink import free_port

    # a Redis server of the benchmark's own (redis-benchmark reads database 0 only)
    redis_port = free_port()
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    server = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=redis_port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    started = time.monotonic()
    load(client, args.users)
    print(f"bench_serve: {args.users:,} profiles loaded in {time.monotonic() - started:.1f} s "
          f"({client.info('memory')['used_memory_human']} in Redis)", file=sys.stderr, flush=True)
    token = "bench-" + os.urandom(16).hex()
    port = free_port()
    env = {**os.environ, "PERSONALIZE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "PERSONALIZE_API_TOKENS": token, "PERSONALIZE_API_PORT": str(port), "PERSONALIZE_API_MAX_LOADER_LAG": "0"}
    api = subprocess.Popen([sys.executable, "-m", "personalize.cli", "serve"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL)
    rows = []
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        for name, path in (("profile reads", "/v1/users/%s"), ("recommendations", "/v1/users/%s/recommendations?n=10")):
            wrk(port, path, args.users, 3, args.connections, token)  # warm-up
            top = wrk(port, path, args.users, args.seconds, args.connections, token)
            print(f"bench_serve: {name}, {args.connections} connections: {top}", file=sys.stderr, flush=True)
            at = paced(port, path, args.users, args.seconds, args.rate, token, top["p50"])
            print(f"bench_serve: {name}, offered ~{args.rate:,}/s: {at}", file=sys.stderr, flush=True)
            half = round(top["rps"] / 2)  # the latency where it is not saturated
            calm = paced(port, path, args.users, args.seconds, half, token, top["p50"])
            print(f"bench_serve: {name}, offered ~{half:,}/s: {calm}", file=sys.stderr, flush=True)
            if top["bad"] or at["bad"] or calm["bad"]:
                print(f"bench_serve: error: {name} answered {top['bad'] + at['bad'] + calm['bad']} requests with "
                      "a non-200", file=sys.stderr)
                return 1
            rows.append((name, top, at, calm))
        ceiling = redis_ceiling(redis_port, args.users)
    finally:
        api.terminate()
        api.wait(timeout=30)
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n| route | most (closed loop, {args.connections} connections) | p50 / p99 there | "
          f"offered ~{args.rate:,}/s: achieved | p50 / p99 there | offered half the most: achieved | p50 / p99 there |")
    print("|---|---|---|---|---|---|---|")
    for name, top, at, calm in rows:
        print(f"| {name} | {top['rps']:,.0f}/s | {top['p50']:.2f} / {top['p99']:.2f} ms | {at['rps']:,.0f}/s | "
              f"**{at['p50']:.2f} / {at['p99']:.2f} ms** | {calm['rps']:,.0f}/s | "
              f"{calm['p50']:.2f} / {calm['p99']:.2f} ms |")
    print(f"| Redis HGETALL ceiling (redis-benchmark, 32 connections) | {ceiling['rps']:,.0f}/s | "
          f"{ceiling['p50']:.2f} / {ceiling['p99']:.2f} ms | | | | |")
    reads = rows[0][2]
    verdict = "met" if reads["p99"] <= 5.0 and reads["rps"] >= 0.96 * args.rate else "NOT met"
    print(f"\ngoal p99 <= 5 ms at {args.rate:,} profile reads/s: {verdict} "
          f"({reads['rps']:,.0f}/s, p99 {reads['p99']:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
