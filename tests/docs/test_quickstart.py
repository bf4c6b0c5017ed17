"""docs/quickstart.md, run as written: its code blocks, in order, in an empty folder, on the local stack.

The page is the test's script: a user copies it line by line, so the test takes the blocks from the
page itself (never a copy of them) and runs them the way the page tells a user to. What a block is
comes from its info string:

* ```` ```bash quickstart ```` runs in bash (``set -euo pipefail``) in the folder; the variables it
  exports, and its ``BG_*`` shell variables, carry over to later blocks, as in one terminal;
* ```` ```bash quickstart background ```` is a command the page runs in a terminal of its own (the
  gateway, the feedback worker): started in its own process group, stopped with SIGINT (Ctrl-C)
  at the end;
* ```` ```LANG file=PATH ```` is a file the page asks the user to save: written to PATH;
* ```` ```json output=ID ```` is sample output of block ``id=ID``: its keys must be the real output's;
* ```` ```bash docker ```` needs a Docker engine, which the test machines lack: syntax-checked only,
  and the files it uses are checked to exist and name what the compose file expects.

Any other block fails the test, so a command added to the page is either run here or declared
not runnable. Ports, topic names and Redis keys come in through the variables the page's env.sh
gives defaults to (free ports and a unique name here), so the page's text is never edited.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kafka_helpers import read_topic
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "quickstart.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
BLOCK_TIMEOUT_S = 180  # the slowest block (training + two profiles) takes a few seconds
STOP_TIMEOUT_S = 30
COUNTED_TIMEOUT_S = 120
ROUTED_IDS = {"kafka-1", "curl-1", "triton-http-1", "triton-grpc-1"}


@dataclass
class Block:
    language: str
    flags: set[str]
    attrs: dict[str, str]
    body: str
    line: int
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        if "file" in self.attrs:
            self.kind = "file"
        elif "output" in self.attrs:
            self.kind = "output"
        elif self.language == "bash" and self.flags == {"quickstart", "background"}:
            self.kind = "background"
        elif self.language == "bash" and self.flags == {"quickstart"}:
            self.kind = "run"
        elif self.language == "bash" and self.flags == {"docker"}:
            self.kind = "docker"
        else:
            self.kind = "unknown"

    def where(self) -> str:
        return f"docs/quickstart.md:{self.line}"


def parse(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        words = match.group(1).split()
        language = words[0] if words else ""
        attrs = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        flags = {w for w in words[1:] if "=" not in w}
        blocks.append(Block(language, flags, attrs, match.group(2), text.count("\n", 0, match.start()) + 1))
    return blocks


def by_id(blocks: list[Block]) -> dict[str, Block]:
    return {b.attrs["id"]: b for b in blocks if "id" in b.attrs}


# ---------------------------------------------------------------------------------------------
# the page's shape (no stack needed)


def test_every_block_is_run_written_or_declared() -> None:
    blocks = parse(DOC.read_text())
    unknown = [f"{b.where()}: ```{b.language} {' '.join(sorted(b.flags))}" for b in blocks if b.kind == "unknown"]
    assert not unknown, f"blocks the quickstart test would not run: {unknown}"
    kinds = [b.kind for b in blocks]
    assert kinds.count("background") == 2 and kinds.count("docker") == 1, kinds
    ids = by_id(blocks)
    assert {"kafka", "curl", "range", "triton", "stats", "metrics"} <= set(ids), sorted(ids)
    assert all(b.attrs["output"] in ids for b in blocks if b.kind == "output")
    for block in blocks:
        if block.kind == "file":
            path = Path(block.attrs["file"])
            assert not path.is_absolute() and ".." not in path.parts, block.where()
        if block.kind == "docker":  # nothing but docker hides in the block the test cannot run
            commands = [ln for ln in block.body.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            assert all(ln.startswith("docker ") for ln in commands), f"{block.where()}: {commands}"
        if block.language == "bash":  # the docker block too: at least it must parse
            check = subprocess.run(["bash", "-n"], input=block.body, capture_output=True, text=True, check=False)
            assert check.returncode == 0, f"{block.where()}: {check.stderr}"


def test_readme_and_docs_index_link_the_quickstart() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/quickstart.md" in "\n".join(readme.splitlines()[:15]), "README.md links the quickstart near the top"
    assert "(quickstart.md)" in (ROOT / "docs" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# running it


def run_block(block: Block, folder: Path, scratch: Path, env: dict[str, str],
              index: int) -> tuple[str, dict[str, str]]:
    """Run a bash block in `folder`; return its stdout and the environment it leaves."""
    script = scratch / f"block-{index}.sh"
    env_out = scratch / f"block-{index}.env"
    # exported variables, and the page's own BG_* shell variables (a later block in the same
    # terminal sees them too)
    script.write_text(f"set -euo pipefail\n{block.body}\nenv -0 > {env_out}\n"
                      f"for v in ${{!BG_@}}; do printf '%s=%s\\0' \"$v\" \"${{!v}}\"; done >> {env_out}\n")
    try:
        done = subprocess.run(["bash", str(script)], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{block.where()}: still running after {BLOCK_TIMEOUT_S}s: {exc.stderr!r}") from None
    if done.returncode != 0:
        raise AssertionError(f"{block.where()} exited {done.returncode}:\n{block.body}\n"
                             f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}")
    pairs = (item.split("=", 1) for item in env_out.read_text().split("\0") if "=" in item)
    return done.stdout, dict(pairs)


@dataclass
class Background:
    block: Block
    process: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return f"--- {self.block.body.strip()} ({self.log.name}):\n{self.log.read_text(errors='replace')[-3000:]}"

    def stop(self) -> None:
        """Ctrl-C, as the page says: SIGINT to the whole group (bash and the command it runs), then
        wait for every process of the group to be gone."""
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            self.process.poll()
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=10)


def start_background(block: Block, folder: Path, scratch: Path, env: dict[str, str], index: int) -> Background:
    log = scratch / f"background-{index}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(["bash", "-c", f"set -euo pipefail\n{block.body}"], cwd=folder, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    return Background(block, process, log)


def arm_hash(redis_url: str, name: str) -> dict[str, str]:
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return client.hgetall(f"{name}:{{churn}}:arms")
    finally:
        client.close()


def wait_counted(redis_url: str, name: str, outcomes: int, background: list[Background]) -> dict[str, str]:
    """The page says the worker counts outcomes "within a second or two": wait for it (bounded)."""
    deadline = time.monotonic() + COUNTED_TIMEOUT_S
    while time.monotonic() < deadline:
        stats = arm_hash(redis_url, name)
        if int(stats.get("counter", 0)) >= outcomes:
            return stats
        time.sleep(0.3)
    raise AssertionError(f"the feedback worker did not count {outcomes} outcomes in {COUNTED_TIMEOUT_S}s: "
                         f"{arm_hash(redis_url, name)}\n" + "\n".join(b.tail() for b in background))


async def cleanup(bootstrap: str, redis_url: str, name: str) -> None:
    """Delete the run's topics (its own and faust's changelogs) and Redis keys."""
    import redis.asyncio as redis_asyncio
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith((f"{name}.", f"{name}-"))]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{name}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def last_json(output: str) -> Any:
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.stack
@pytest.mark.slow
def test_quickstart_runs_as_written(stack, unique: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    blocks = parse(DOC.read_text())
    name = f"qs{unique}"
    folder, scratch = tmp_path / "quickstart", tmp_path / "test"  # the user's folder holds only the page's files
    folder.mkdir()
    scratch.mkdir()
    env = {**os.environ, "BANDITGATE_KAFKA": stack.kafka, "BANDITGATE_REDIS": stack.redis, "BG_NAME": name,
           "BG_HTTP_PORT": str(free_port()), "BG_GRPC_PORT": str(free_port()), "BG_FEEDBACK_PORT": str(free_port()),
           # the console script must import this checkout, whichever install put it on PATH
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    outputs: dict[str, str] = {}
    background: list[Background] = []
    try:
        for index, block in enumerate(blocks):
            if block.kind == "file":
                path = folder / block.attrs["file"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block.body)
            elif block.kind == "background":
                background.append(start_background(block, folder, scratch, env, index))
            elif block.kind == "run":
                if block.attrs.get("id") == "stats":
                    wait_counted(stack.redis, name, 2, background)
                try:
                    out, env = run_block(block, folder, scratch, env, index)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n" + "\n".join(b.tail() for b in background)) from None
                if "id" in block.attrs:
                    outputs[block.attrs["id"]] = out
        check_results(blocks, outputs, stack, name, folder, env)
    finally:
        for process in background:
            process.stop()
        asyncio.run(cleanup(stack.kafka, stack.redis, name))
    for process in background:  # stopped with Ctrl-C as the page says, neither failed on the way
        assert "Traceback" not in process.log.read_text(errors="replace"), process.tail()


def check_results(blocks: list[Block], outputs: dict[str, str], stack, name: str,  # type: ignore[no-untyped-def]
                  folder: Path, env: dict[str, str]) -> None:
    arms = {"v1": 1, "v2": 2}
    # Kafka: the prediction event, shaped like the page's sample
    prediction = last_json(outputs["kafka"])
    assert prediction["request_id"] == "kafka-1" and prediction["route"] == "churn"
    assert prediction["model"] == "churn" and prediction["model_version"] == arms[prediction["arm"]]
    assert prediction["outputs"]["class"] in ("stays", "churns") and 0 < prediction["propensity"] <= 1
    sample = json.loads(next(b.body for b in blocks if b.attrs.get("output") == "kafka"))
    assert set(sample) == set(prediction) and set(sample["outputs"]) == set(prediction["outputs"])
    # REST: routed, and the row out of range refused
    rest = last_json(outputs["curl"])
    assert rest["parameters"]["route"] == "churn" and rest["parameters"]["request_id"] == "curl-1"
    assert {o["name"] for o in rest["outputs"]} == {"label", "probabilities"}
    assert "outside the model's range" in last_json(outputs["range"])["error"]
    # tritonclient, HTTP and gRPC: both answered by an arm
    lines = outputs["triton"].strip().splitlines()
    assert [line.split()[0] for line in lines] == ["http:", "grpc:"] and all(line.split()[1] in arms for line in lines)
    # every routed request was logged on the predictions topic (so its outcome can join)
    logged = asyncio.run(read_topic(stack.kafka, f"{name}.predictions", len(ROUTED_IDS), timeout_s=60))
    served = {p["request_id"]: p["arm"] for p in logged}
    assert ROUTED_IDS <= set(served), sorted(served)
    # the two outcomes were applied to the arms that served: kafka-1 reward 1, curl-1 reward 0
    stats = arm_hash(stack.redis, name)
    assert int(stats["counter"]) == 2, stats
    expected: dict[str, list[float]] = {}
    for request_id, reward in (("kafka-1", 1.0), ("curl-1", 0.0)):
        expected.setdefault(served[request_id], []).append(reward)
    for arm, rewards in expected.items():
        assert float(stats[f"{arm}:w"]) == pytest.approx(len(rewards)), stats
        assert float(stats[f"{arm}:m"]) == pytest.approx(sum(rewards) / len(rewards)), stats
    # what the page shows the user: the admin API and the metrics agree with Redis
    shown = last_json(outputs["stats"])["arms"]
    assert set(shown) == set(arms)
    for arm in arms:
        assert shown[arm]["weight"] == pytest.approx(len(expected.get(arm, []))), shown
    metrics = outputs["metrics"]
    assert re.search(r'^banditgate_arm_posterior_mean\{[^}]*route="churn"', metrics, re.M), metrics
    check_grafana_files(folder, env)


def check_grafana_files(folder: Path, env: dict[str, str]) -> None:
    """What the docker block uses: the scrape config names the jobs the dashboards and alert rules
    expect and this run's ports; the override mounts it where the compose Prometheus reads it."""
    ours = yaml.safe_load((folder / "prometheus.yml").read_text())
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert [j["job_name"] for j in ours["scrape_configs"]] == [j["job_name"] for j in shipped["scrape_configs"]]
    targets = [t for j in ours["scrape_configs"] for c in j["static_configs"] for t in c["targets"]]
    assert targets == [f"host.docker.internal:{env['BG_HTTP_PORT']}", f"host.docker.internal:{env['BG_FEEDBACK_PORT']}"]
    assert ours["rule_files"] == shipped["rule_files"]
    override = yaml.safe_load((folder / "grafana.yml").read_text())["services"]["prometheus"]
    source, target, _mode = override["volumes"][0].split(":")
    assert Path(source) == folder / "prometheus.yml" and target == "/etc/prometheus/prometheus.yml"
    assert Path(env["BG_SRC"]).resolve() == ROOT, env["BG_SRC"]  # the clone, where docker-compose.yml is
    compose = yaml.safe_load((Path(env["BG_SRC"]) / "docker-compose.yml").read_text())["services"]
    assert {"prometheus", "grafana"} <= set(compose)
    assert "./deploy/prometheus:/etc/prometheus:ro" in compose["prometheus"]["volumes"]
