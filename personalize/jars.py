"""JVM artifacts from Maven Central: Flink's Kafka connector and the Kafka broker.

``python -m personalize.jars`` (run by ``make setup``) resolves the profiles of
``docker/pom.xml`` with Maven into ``lib/<profile>/`` and records the pom's hash
in ``lib/<profile>/.resolved``; the next run checks every jar (a readable zip)
and the hash, and does nothing when both hold. No jar is committed.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from personalize.errors import MissingArtifact
from personalize.settings import Settings, project_root

POM = project_root() / "docker" / "pom.xml"
PROFILES = ("flink", "kafka")
# the jar each profile must hold, checked by name prefix
REQUIRED = {"flink": ("flink-sql-connector-kafka-",), "kafka": ("kafka_2.13-", "kafka-clients-", "log4j-core-")}


def _pom_hash() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def profile_dir(settings: Settings, profile: str) -> Path:
    return settings.lib_dir / profile


def problems(settings: Settings, profile: str) -> list[str]:
    """What is wrong with a profile's folder; empty when it is complete and current."""
    folder = profile_dir(settings, profile)
    marker = folder / ".resolved"
    if not marker.is_file():
        return [f"{folder} was never resolved"]
    found: list[str] = []
    if POM.is_file() and marker.read_text().strip() != _pom_hash():
        found.append(f"{POM} changed since {folder} was resolved")
    jars = sorted(folder.glob("*.jar"))
    for prefix in REQUIRED[profile]:
        if not any(j.name.startswith(prefix) for j in jars):
            found.append(f"{folder} has no {prefix}*.jar")
    for jar in jars:
        if not zipfile.is_zipfile(jar):
            found.append(f"{jar} is not a readable jar")
    return found


def jars(settings: Settings, profile: str) -> list[Path]:
    """The jars of a profile, or a MissingArtifact error that says to run make setup."""
    wrong = problems(settings, profile)
    if wrong:
        raise MissingArtifact(f"{wrong[0]}: run `make setup` (resolves the jars from Maven Central)")
    return sorted(profile_dir(settings, profile).glob("*.jar"))


def resolve(settings: Settings, profile: str) -> bool:
    """Resolve one profile with Maven unless it is already complete; True when it ran Maven."""
    if not problems(settings, profile):
        return False
    mvn = shutil.which("mvn")
    if mvn is None:
        raise MissingArtifact("mvn (Apache Maven) is not on PATH: install Maven 3.8+ to resolve the jars")
    folder = profile_dir(settings, profile)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cmd = [
        mvn, "-q", "-B", "-f", str(POM), "-P", profile,
        "dependency:copy-dependencies",
        f"-DoutputDirectory={folder}", "-DincludeScope=runtime",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise MissingArtifact(f"Maven could not resolve profile {profile!r} of {POM}: " + " | ".join(tail))
    (folder / ".resolved").write_text(_pom_hash() + "\n")
    wrong = problems(settings, profile)
    if wrong:
        raise MissingArtifact(f"after resolving {profile!r}: {wrong[0]}")
    return True


def main() -> int:
    settings = Settings.from_env()
    for profile in PROFILES:
        started = time.monotonic()
        try:
            ran = resolve(settings, profile)
        except MissingArtifact as exc:
            print(f"jars: error: {exc}", file=sys.stderr)
            return 2
        found = jars(settings, profile)
        size = sum(j.stat().st_size for j in found) / 1e6
        how = f"resolved in {time.monotonic() - started:.1f}s" if ran else "already resolved, checked"
        print(f"jars: {profile}: {len(found)} jars, {size:.0f} MB in {profile_dir(settings, profile)} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
