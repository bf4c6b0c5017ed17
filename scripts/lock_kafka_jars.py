"""Write the Kafka jar lock file that `banditgate stack up` downloads and verifies without Maven.

Run it once per Kafka (or log4j) version bump, on a machine with Maven, and commit the result:

    python scripts/lock_kafka_jars.py            # writes banditgate/stack_files/kafka-jars-<version>.json

It resolves exactly what the stack's Maven path resolves (the same pom: kafka_2.13 + kafka-tools
+ the log4j2 slf4j-1.x binding + log4j-core, runtime scope) with
`mvn -C dependency:copy-dependencies -Dmdep.useRepositoryLayout=true`, so every jar lands at its
repository path (group/artifact/version/file, the path under Maven Central's root), with Maven
checking each download against the repository's checksum (`-C`). The lock records that path, the
file's size and its sha256 (Maven Central publishes only sha1/md5 for most artifacts; sha256 is
ours, computed here from the files Maven verified).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from banditgate import jars  # noqa: E402 - after the path insert
from banditgate.stack import KAFKA_VERSION, LOG4J_VERSION, kafka_pom  # noqa: E402


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(work: Path) -> list[dict]:
    """Run Maven in `work`; return one lock entry per jar, sorted by path."""
    mvn = shutil.which("mvn")
    if not mvn:
        raise SystemExit("lock_kafka_jars: no `mvn` on PATH (this script is the one place Maven is required)")
    (work / "pom.xml").write_text(kafka_pom())
    out = work / "repo"
    proc = subprocess.run(  # noqa: S603 - fixed argv
        [mvn, "-q", "-B", "-C", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
         "-DincludeScope=runtime", "-Dmdep.useRepositoryLayout=true", "-Dmdep.copyPom=false",
         f"-DoutputDirectory={out}"],
        capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        raise SystemExit(f"lock_kafka_jars: mvn failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    entries = []
    for path in sorted(out.rglob("*.jar")):
        relative = path.relative_to(out).as_posix()
        parts = relative.split("/")
        version, artifact, group = parts[-2], parts[-3], ".".join(parts[:-3])
        entries.append({"coordinates": f"{group}:{artifact}:{version}", "path": relative, "file": parts[-1],
                        "size": path.stat().st_size, "sha256": sha256_of(path)})
    names = [entry["file"] for entry in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:  # the stack keeps the jars in one flat folder
        raise SystemExit(f"lock_kafka_jars: two artifacts share a file name: {', '.join(duplicates)}")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=jars.lock_path(KAFKA_VERSION), help="lock file to write")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="banditgate-lock-") as tmp:
        entries = resolve(Path(tmp))
    document = {
        "format": jars.LOCK_FORMAT,
        "kafka_version": KAFKA_VERSION,
        "log4j_version": LOG4J_VERSION,
        "generated_by": "scripts/lock_kafka_jars.py: mvn -C dependency:copy-dependencies -DincludeScope=runtime",
        "jars": entries,
    }
    jars.parse_lock(document, source=str(args.out))  # what we write must be what the stack accepts
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    total_mb = sum(entry["size"] for entry in entries) / 1e6
    print(f"{args.out}: {len(entries)} jars, {total_mb:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
