"""Lint the Helm chart and validate what it renders: `python scripts/check_chart.py` (.ci/run runs it).

helm (scripts/helm.sh: the one on PATH, or the pinned version built from its Go module) lints
deploy/helm/banditgate and renders it twice, with the defaults and with every optional part on
(each `enabled: false` in values.yaml set to true). Every rendered document except the custom
resources (ServiceMonitor, PrometheusRule, ScaledObject: their CRDs are not Kubernetes' own) is
validated offline against the Kubernetes schemas of --kube-version by kubernetes-validate. Prints
one line per render; exits 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "banditgate"
CUSTOM_KINDS = frozenset({"ServiceMonitor", "PrometheusRule", "ScaledObject"})


def optional_parts_on(values_path: Path = CHART / "values.yaml") -> list[str]:
    """`KEY=true` (a `--set` argument) for every `enabled: false` in the values file."""
    found: list[str] = []

    def walk(node: dict[str, Any], path: list[str]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, [*path, key])
            elif key == "enabled" and value is False:
                found.append(".".join([*path, key]) + "=true")

    walk(yaml.safe_load(values_path.read_text()) or {}, [])
    return found


def find_helm() -> str:
    """scripts/helm.sh's answer; raises RuntimeError (its one line) when there is no helm to be had."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "helm.sh")], capture_output=True, text=True, timeout=1800,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "scripts/helm.sh failed")
    return result.stdout.strip().splitlines()[-1]


def validate(docs: list[dict[str, Any]], kube_version: str) -> list[str]:
    """One line per document that does not validate (kind/name: the schema's complaint)."""
    import kubernetes_validate  # the dev extra: imported here so --help works without it

    problems = []
    for doc in docs:
        if doc.get("kind") in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(part) for part in exc.absolute_path)
            problems.append(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: no Kubernetes {kube_version} "
                            f"schema for {doc.get('apiVersion')} {doc.get('kind')}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kube-version", default="1.30", help="Kubernetes schema version (default: 1.30)")
    args = parser.parse_args(argv)
    try:
        helm = find_helm()
    except RuntimeError as exc:
        print(f"check_chart: {exc}", file=sys.stderr)
        return 1
    problems = []
    for name, sets in (("defaults", []), ("every optional part on", optional_parts_on())):
        set_args = [arg for item in sets for arg in ("--set", item)]
        lint = subprocess.run([helm, "lint", str(CHART), *set_args], capture_output=True, text=True, timeout=300, check=False)
        if lint.returncode != 0:
            problems.append(f"helm lint ({name}): {(lint.stdout + lint.stderr).strip().splitlines()[-1]}")
        rendered = subprocess.run([helm, "template", "banditgate", str(CHART), *set_args], capture_output=True,
                                  text=True, timeout=300, check=False)
        if rendered.returncode != 0:
            problems.append(f"helm template ({name}): {rendered.stderr.strip().splitlines()[-1]}")
            continue
        docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
        found = validate(docs, args.kube_version)
        problems += [f"{name}: {line}" for line in found]
        kinds = sorted({doc["kind"] for doc in docs})
        print(f"check_chart: {name}: {len(docs)} documents ({', '.join(kinds)}), "
              f"{'valid' if not found else f'{len(found)} invalid'} for Kubernetes {args.kube_version}")
    for line in problems:
        print(f"check_chart: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
