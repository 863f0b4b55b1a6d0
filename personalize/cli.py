"""``personalize``: the command line (names are part of the public contract, DESIGN.md).

Every command reads the one frozen ``Settings`` from ``PERSONALIZE_*`` variables;
flags override single fields. A ``PersonalizeError`` ends the command with one
line on stderr and its exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from personalize import logs
from personalize.errors import PersonalizeError
from personalize.settings import Settings


def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from personalize import stack

    if args.action == "up":
        statuses = stack.up(settings)
        _print_status(statuses)
        return 0 if all(s.running for s in statuses) else 1
    if args.action == "down":
        stopped = stack.down(settings, purge=args.purge)
        what = ", ".join(stopped) if stopped else "nothing was running"
        print(f"stopped: {what}" + (f"; deleted the data in {settings.stack_dir}" if args.purge else ""))
        return 0
    statuses = stack.status(settings)
    _print_status(statuses)
    return 0 if all(s.running for s in statuses) else 1


def _print_status(statuses) -> None:
    for s in statuses:
        label = "bootstrap servers" if s.name == "kafka" else "url"
        pid = f"pid {s.pid}" if s.pid else "no pid"
        line = f"{s.name:<6} {s.state:<8} {pid:<10} {label} {s.address}"
        if s.detail:
            line += f"  ({s.detail})"
        print(line)


def _smoke(args: argparse.Namespace, settings: Settings) -> int:
    from personalize import smoke

    report = smoke.run_smoke(
        settings,
        messages=args.messages,
        source_topic=args.source_topic,
        sink_topic=args.sink_topic,
    )
    print(report.describe())
    return 0 if report.ok else 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from personalize import run

    if args.parallelism:
        settings = dataclasses.replace(settings, parallelism=args.parallelism)
    if args.from_savepoint and not args.bounded and "://" not in args.from_savepoint:
        path = Path(args.from_savepoint)
        if not (path.is_file() or (path / "_metadata").is_file()):
            raise PersonalizeError(f"--from-savepoint {args.from_savepoint}: no savepoint there (a folder with a "
                                   "_metadata file, as `personalize run` and `personalize stop` print)")
    if not args.bounded:
        report = run.run_unbounded(settings, from_savepoint=args.from_savepoint)
        print(report.describe())
        return 0
    if args.from_savepoint:
        raise PersonalizeError("--from-savepoint is for unbounded runs: bounded runs start with fresh state")
    summary = run.run_bounded(settings)
    print(summary.describe())
    return 0


def _profile(args: argparse.Namespace, settings: Settings) -> int:
    import orjson

    from sinks.redis import PROFILE_PREFIX, redis_client

    user = settings.user_key(args.user_id)  # the pseudonym, with PERSONALIZE_PSEUDONYM_KEY
    raw = redis_client(settings).hgetall(PROFILE_PREFIX + user)
    if not raw:
        print(f"personalize: no profile for user {args.user_id!r} in {settings.redis_address}", file=sys.stderr)
        return 1
    profile = {k.decode(): v.decode() for k, v in sorted(raw.items())}
    named = {"user_id": args.user_id, **({"pseudonym": user} if user != args.user_id else {})}
    print(orjson.dumps({**named, **profile}).decode())
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from personalize import serve

    if args.host:
        settings = dataclasses.replace(settings, api_host=args.host)
    if args.port:
        settings = dataclasses.replace(settings, api_port=args.port)
    serve.serve(settings)
    return 0


def _forget(args: argparse.Namespace, settings: Settings) -> int:
    import orjson

    from personalize import forget
    from sinks.redis import user_digest

    user, requested_ms = forget.request(settings, args.user_id)
    said = {"erasure": user_digest(user), "requested_ms": requested_ms, "topic": settings.topic_erasures}
    if args.wait:
        forget.wait_applied(settings, user, requested_ms, args.wait)
        said["redis"] = "nothing of the user left"
    print(orjson.dumps(said).decode())
    return 0


def _triggers(args: argparse.Namespace, settings: Settings) -> int:
    import orjson

    import schemas
    from operators.triggers import as_json
    from personalize import kafkaio

    codec = schemas.codec("trigger")
    topic = settings.topic_triggers
    if args.follow:
        import signal
        import threading

        # Ctrl-C ends the follow between two polls: a KeyboardInterrupt raised inside the Kafka
        # client can leave a lock of it held, and its close() then hangs
        stopped = threading.Event()
        signal.signal(signal.SIGINT, lambda signum, frame: stopped.set())
        records = kafkaio.follow(settings, topic, stop=stopped.is_set)
    else:
        records = kafkaio.read_to_end(settings, topic)
    shown = 0
    try:
        for rec in records:
            if args.limit is not None and shown >= args.limit:
                break
            if rec.value is None:  # a forgotten user's tombstone
                continue
            try:
                trigger = codec.decode(rec.value)
            except schemas.DecodeError as exc:
                print(f"personalize: skipped {topic} partition {rec.partition} offset {rec.offset}: {exc.reason}",
                      file=sys.stderr)
                continue
            print(orjson.dumps(as_json(trigger)).decode(), flush=True)
            shown += 1
    except KeyboardInterrupt:
        if not args.follow:
            raise
    finally:
        if hasattr(records, "close"):
            records.close()
    return 0


def _cluster(args: argparse.Namespace, settings: Settings) -> int:
    from personalize import cluster

    if args.action == "up":
        print(cluster.up(settings).describe())
    elif args.action == "down":
        cluster.down(settings)
        print(cluster.status(settings).describe())
    else:
        current = cluster.status(settings)
        print(current.describe())
        return 0 if current.running else 1
    return 0


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from personalize import cluster

    job_id = cluster.submit(settings, from_savepoint=args.from_savepoint, parallelism=args.parallelism)
    print(f"job {job_id} running on http://{settings.flink_address}/#/job/running/{job_id}/overview")
    print("Redis follows the job's committed output with `personalize load --follow`")
    return 0


def _stop(args: argparse.Namespace, settings: Settings) -> int:
    from personalize import cluster

    if not args.savepoint:
        raise PersonalizeError("stop needs --savepoint (a stop without one would lose the job's state)")
    print(f"savepoint {cluster.stop_with_savepoint(settings, args.job_id)}")
    return 0


def _load(args: argparse.Namespace, settings: Settings) -> int:
    import threading

    from sinks.redis import Materializer

    loader = Materializer(settings)
    if args.follow:
        from personalize.metrics import start_loader_endpoint

        start_loader_endpoint(settings)
        stop = threading.Event()
        try:
            loader.follow(stop.is_set)
        except KeyboardInterrupt:
            pass
        s = loader.stats
    else:
        s = loader.drain()
    print(f"loaded {s.records} records: {s.profile_writes} profile writes for {len(s.users)} users, "
          f"{s.stream_added} new triggers in the Redis stream")
    return 0


def _models(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.redis import MODELS_KEY, redis_client

    raw = redis_client(settings).get(MODELS_KEY)
    if raw is None:
        print(f"personalize: no model snapshot in {settings.redis_address} yet: run the job first "
              "(`personalize run --bounded`)", file=sys.stderr)
        return 1
    print(raw.decode())
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from personalize import replay, run

    run.ensure_topics(settings)
    if args.if_empty and _holds_records(settings, args.topic):
        return 0
    result, rate = replay.replay(settings, Path(args.file), topic=args.topic)
    print(f"replayed {len(result.events)} events ({result.format}) to "
          f"{args.topic or settings.topic_events!r} at {rate:,.0f} events/s; "
          f"{len(result.bad_rows)} unreadable rows" +
          (": " + ", ".join(f"line {n} ({why})" for n, why in result.bad_rows[:5]) if result.bad_rows else ""))
    return 0


def _holds_records(settings: Settings, topic: str | None) -> bool:
    """For --if-empty: whether the target topic already holds records (it is created when missing)."""
    from personalize import kafkaio, run

    run.ensure_topics(settings)
    topic = topic or settings.topic_events
    from personalize import topics as topics_mod

    topics_mod.ensure(settings, [topic], local_stack=True)
    begin, end = kafkaio.offsets(settings, topic, read_committed=False)
    held = sum(end[p] - begin[p] for p in end)
    if held:
        print(f"{topic!r} already holds {held} records: nothing sent (--if-empty)")
    return held > 0


def _produce(args: argparse.Namespace, settings: Settings) -> int:
    from personalize import produce

    if args.if_empty and _holds_records(settings, args.topic):
        return 0

    spec = produce.TrafficSpec(
        users=args.users, sessions_per_user=args.sessions, abandonment_rate=args.abandonment_rate,
        no_personalization_rate=args.no_personalization_rate, no_marketing_rate=args.no_marketing_rate,
        jitter_ms=args.jitter_ms, gap_ms=settings.session_gap_ms, seed=args.seed,
        **({"start_ms": args.start_ms} if args.start_ms is not None else {}),
    )
    sent, rate = produce.produce(settings, spec, topic=args.topic)
    print(f"produced {sent} events for {args.users} users to {args.topic or settings.topic_events!r} "
          f"at {rate:,.0f} events/s")
    return 0


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="personalize",
        description="Real-time personalization on PyFlink: Kafka events to live profiles and triggers.",
    )
    parser.add_argument("--log-format", choices=("console", "json"), help="override PERSONALIZE_LOG_FORMAT")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stack", help="local Kafka (KRaft) and Redis on loopback: up, down, status")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--purge", action="store_true", help="with down: also delete the stack's data")
    p.set_defaults(func=_stack)

    p = sub.add_parser("run", help="the profile job on the embedded local Flink")
    p.add_argument("--bounded", action="store_true",
                   help="read from the earliest offset to the current end, fire every window, exit")
    p.add_argument("--parallelism", type=_positive, help="override PERSONALIZE_PARALLELISM")
    p.add_argument("--from-savepoint", metavar="PATH",
                   help="resume from this savepoint (default: the newest savepoint or checkpoint kept)")
    p.set_defaults(func=_run)

    p = sub.add_parser("produce", help="synthetic shopper traffic as Avro to the events topic")
    p.add_argument("--users", type=_positive, default=1000)
    p.add_argument("--sessions", type=_positive, default=2, help="sessions per user")
    p.add_argument("--abandonment-rate", type=_rate, default=0.6, help="share of carts left unpurchased")
    p.add_argument("--no-personalization-rate", type=_rate, default=0.05,
                   help="share of users without personalization consent")
    p.add_argument("--no-marketing-rate", type=_rate, default=0.1, help="share of users without marketing consent")
    p.add_argument("--jitter-ms", type=_non_negative, default=2000, help="out-of-order jitter of the send order")
    p.add_argument("--start-ms", type=_non_negative, help="event time of the first day (default 2019-10-01)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--topic", help="target topic (default: PERSONALIZE_TOPIC_EVENTS)")
    p.add_argument("--if-empty", action="store_true", help="send nothing when the topic already holds records")
    p.set_defaults(func=_produce)

    p = sub.add_parser("replay", help="replay a CSV / JSON-lines event log in event-time order")
    p.add_argument("file", help="canonical CSV, REES46 CSV, or Taobao UserBehavior JSON lines")
    p.add_argument("--topic", help="target topic (default: PERSONALIZE_TOPIC_EVENTS)")
    p.add_argument("--if-empty", action="store_true", help="send nothing when the topic already holds records")
    p.set_defaults(func=_replay)

    p = sub.add_parser("profile", help="a user's live profile from Redis, as one JSON object")
    p.add_argument("user_id")
    p.set_defaults(func=_profile)

    p = sub.add_parser("serve", help="the HTTP API: profiles, recommendations, segments, interventions (SSE)")
    p.add_argument("--host", help="override PERSONALIZE_API_HOST (default 127.0.0.1)")
    p.add_argument("--port", type=_port, help="override PERSONALIZE_API_PORT (default 8000)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("forget", help="forget a user: profile, triggers and the job's state (an erasure request)")
    p.add_argument("user_id", help="the raw id (its pseudonym is applied under PERSONALIZE_PSEUDONYM_KEY)")
    p.add_argument("--wait", type=_non_negative, default=0, metavar="SECONDS",
                   help="then wait up to SECONDS until Redis holds nothing of the user (default: do not wait)")
    p.set_defaults(func=_forget)

    p = sub.add_parser("cluster", help="a local standalone Flink cluster (web UI on PERSONALIZE_FLINK_REST_PORT)")
    p.add_argument("action", choices=("up", "down", "status"))
    p.set_defaults(func=_cluster)

    p = sub.add_parser("submit", help="submit the (unbounded) job to the Flink cluster at PERSONALIZE_FLINK_ADDRESS")
    p.add_argument("--from-savepoint", metavar="PATH", help="resume from this savepoint")
    p.add_argument("--parallelism", type=_positive, help="override PERSONALIZE_PARALLELISM")
    p.set_defaults(func=_submit)

    p = sub.add_parser("stop", help="stop the job on the cluster with a savepoint and print its path")
    p.add_argument("--savepoint", action="store_true", help="take a savepoint (required)")
    p.add_argument("job_id", nargs="?", help="default: the one running 'personalize' job")
    p.set_defaults(func=_stop)

    p = sub.add_parser("load", help="bring Redis up to date from the job's committed output (a cluster job's loader)")
    p.add_argument("--follow", action="store_true", help="keep loading until Ctrl-C")
    p.set_defaults(func=_load)

    p = sub.add_parser("triggers", help="cart-abandonment triggers as JSON lines from the topic (read_committed)")
    p.add_argument("--follow", action="store_true", help="keep printing new triggers until Ctrl-C")
    p.add_argument("--limit", type=_non_negative, help="stop after this many")
    p.set_defaults(func=_triggers)

    p = sub.add_parser("models", help="the models' metrics and segments (the job's latest snapshot), as JSON")
    p.set_defaults(func=_models)

    p = sub.add_parser(
        "smoke",
        help="produce Avro events, copy them through Flink's Kafka source and exactly-once sink, count them",
    )
    p.add_argument("--messages", type=_non_negative, default=1000,
                   help="how many events to produce to the source topic first (0: use what is there)")
    p.add_argument("--source-topic", help="topic to read (default: a new uuid-named topic)")
    p.add_argument("--sink-topic", help="topic to write (default: a new uuid-named topic)")
    p.set_defaults(func=_smoke)
    return parser


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port between 1 and 65535, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = None
    try:
        settings = Settings.from_env()
        if args.log_format:
            settings = dataclasses.replace(settings, log_format=args.log_format)
        logs.configure(settings.log_format, secrets=settings.secrets)
        return args.func(args, settings)
    except PersonalizeError as exc:
        message = settings.redact(str(exc)) if settings else str(exc)
        print(f"personalize: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("personalize: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not {"Py4JJavaError", "JavaException"} & {c.__name__ for c in type(exc).__mro__}:
            raise
        from personalize.flink import job_failure

        failure = job_failure(exc)
        print(f"personalize: error: Flink refused the job: {settings.redact(failure) if settings else failure}",
              file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
