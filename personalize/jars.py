"""JVM artifacts: Flink's Kafka connector and the Kafka broker from Maven Central, and
the job's one JVM function (the decode step) built from ``operators/jvm``.

``python -m personalize.jars`` (run by ``make setup``) resolves the profiles of
``docker/pom.xml`` with Maven into ``lib/<profile>/``, and packages
``operators/jvm`` (its pom, its Java sources and the user_event schemas it packs)
into ``lib/udf/``; each folder records the hash of what made it in ``.resolved``.
The next run checks every jar (a readable zip) and the hash, and does nothing when
both hold. No jar is committed.
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
UDF = project_root() / "operators" / "jvm"
PROFILES = ("flink", "kafka", "udf")
# the jar each profile must hold, checked by name prefix
REQUIRED = {"flink": ("flink-sql-connector-kafka-",), "kafka": ("kafka_2.13-", "kafka-clients-", "log4j-core-"),
            "udf": ("personalize-decode",)}


def _udf_inputs() -> list[Path]:
    schemas = project_root() / "schemas"
    return [UDF / "pom.xml", *sorted((UDF / "src").rglob("*.java"), key=str), schemas / "user_event.avsc",
            *sorted((schemas / "versions").glob("user_event.v*.avsc"), key=str)]


def _pom_hash(profile: str) -> str:
    """The sha256 of what a profile's folder is made from: the pom for a resolved profile,
    the build's files one after the other for ``udf`` (the Dockerfile writes both the same way)."""
    if profile != "udf":
        return hashlib.sha256(POM.read_bytes()).hexdigest()
    return hashlib.sha256(b"".join(path.read_bytes() for path in _udf_inputs())).hexdigest()


def profile_dir(settings: Settings, profile: str) -> Path:
    return settings.lib_dir / profile


def problems(settings: Settings, profile: str) -> list[str]:
    """What is wrong with a profile's folder; empty when it is complete and current."""
    folder = profile_dir(settings, profile)
    marker = folder / ".resolved"
    if not marker.is_file():
        return [f"{folder} was never resolved"]
    found: list[str] = []
    if POM.is_file() and marker.read_text().strip() != _pom_hash(profile):
        found.append(f"{UDF if profile == 'udf' else POM} changed since {folder} was made")
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


def job_jars(settings: Settings) -> list[Path]:
    """What the job's class path needs: the Kafka connector and the decode function."""
    return jars(settings, "flink") + jars(settings, "udf")


def resolve(settings: Settings, profile: str) -> bool:
    """Resolve (or for ``udf`` build) one profile with Maven unless it is already complete;
    True when it ran Maven."""
    if not problems(settings, profile):
        return False
    mvn = shutil.which("mvn")
    if mvn is None:
        raise MissingArtifact("mvn (Apache Maven) is not on PATH: install Maven 3.8+ to resolve the jars")
    folder = profile_dir(settings, profile)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if profile == "udf":
        cmd = [mvn, "-q", "-B", "-f", str(UDF / "pom.xml"), "package"]
    else:
        cmd = [
            mvn, "-q", "-B", "-f", str(POM), "-P", profile,
            "dependency:copy-dependencies",
            f"-DoutputDirectory={folder}", "-DincludeScope=runtime",
        ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        what = f"build {UDF / 'pom.xml'}" if profile == "udf" else f"resolve profile {profile!r} of {POM}"
        raise MissingArtifact(f"Maven could not {what}: " + " | ".join(tail))
    if profile == "udf":
        shutil.copy2(UDF / "target" / "personalize-decode.jar", folder / "personalize-decode.jar")
    (folder / ".resolved").write_text(_pom_hash(profile) + "\n")
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
        verb = "built" if profile == "udf" else "resolved"
        how = f"{verb} in {time.monotonic() - started:.1f}s" if ran else f"already {verb}, checked"
        print(f"jars: {profile}: {len(found)} jars, {size:.0f} MB in {profile_dir(settings, profile)} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
