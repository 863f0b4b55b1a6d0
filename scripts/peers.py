"""The peers of `make bench-peers`, as the benchmark scripts start them (bench/, its own venv)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / "bench" / ".venv" / "bin" / "python"


@dataclass(frozen=True)
class Peer:
    key: str
    framework: str
    package: str  # as bench/requirements.txt pins it
    app: str  # in bench/
    guarantee: str  # of its trigger feed, as the benchmark runs it
    backfill: dict = field(default_factory=dict)  # its environment over a backlog
    live: dict = field(default_factory=dict)  # its environment over live traffic
    # the backfill ends when the process exits (a bounded source); else when its group committed the topic
    exits_at_end: bool = False

    @property
    def label(self) -> str:
        return f"{self.framework} {version(self.package)}"

    def command(self) -> list[str]:
        return [str(PYTHON), str(ROOT / "bench" / self.app)]


PEERS = {
    "quix": Peer("quix", "Quix Streams", "quixstreams", "quix_peer.py", "exactly-once (Kafka transactions at commits)"),
    # a bounded source (the backfill stops at the topic's end, closing every session) and no
    # wake-ups by the system clock, which old event times would make for every key at once
    "bytewax": Peer("bytewax", "Bytewax", "bytewax", "bytewax_peer.py",
                    "none (no recovery configured; with it, at-least-once)", backfill={"PEER_TAIL": "0", "PEER_WAKE": "none"},
                    live={"PEER_TAIL": "1", "PEER_WAKE": "system"}, exits_at_end=True),
}


def version(package: str) -> str:
    """The version bench/requirements.txt pins."""
    text = (ROOT / "bench" / "requirements.txt").read_text()
    match = re.search(rf"^{re.escape(package)}(\[[^\]]*\])?==(\S+)", text, re.MULTILINE)
    return match.group(2) if match else "?"

