"""Fail when ``Any`` is used in the product packages without saying which third-party API is untyped.

Rule (issue 21, docs/CONTRIBUTING.md): every line of code in banditgate/, gateway/, router/ and
feedback/ that names ``typing.Any`` carries a ``# Any: <why>`` comment on the same line naming the
untyped third-party API (aiokafka, faust, onnxruntime, ...), or uses ``banditgate.jsontypes``
(``JSONValue`` / ``JSONObject``) for decoded JSON. Import lines are exempt. Generated protobuf code
is skipped. Prints one line per offence and a summary; exit 1 when any.
"""
from __future__ import annotations

import io
import pathlib
import sys
import tokenize

PACKAGES = ("banditgate", "gateway", "router", "feedback")


def offences(path: pathlib.Path) -> list[tuple[int, str]]:
    src = path.read_text()
    lines = src.splitlines()
    any_lines: set[int] = set()
    justified: set[int] = set()
    imports: set[int] = set()
    toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    for i, tok in enumerate(toks):
        if tok.type == tokenize.NAME and tok.string == "Any":
            any_lines.add(tok.start[0])
        elif tok.type == tokenize.COMMENT and tok.string.lstrip("# ").startswith("Any:"):
            justified.add(tok.start[0])
        elif tok.type == tokenize.NAME and tok.string in ("import", "from") and (
                i == 0 or toks[i - 1].type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT,
                                               tokenize.DEDENT, tokenize.ENCODING)):
            # an import statement: every physical line up to its NEWLINE is exempt
            j = i
            while j < len(toks) and toks[j].type != tokenize.NEWLINE:
                imports.add(toks[j].start[0])
                j += 1
    out = []
    for n in sorted(any_lines - justified - imports):
        # a multi-line expression may carry its justification on its last line
        out.append((n, lines[n - 1].strip()))
    return out


def main(argv: list[str]) -> int:
    root = pathlib.Path(argv[1]) if len(argv) > 1 else pathlib.Path(".")
    bad = 0
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            if "_pb2" in f.name:
                continue
            for n, text in offences(f):
                bad += 1
                print(f"{f.relative_to(root)}:{n}: Any without a '# Any: <untyped third-party API>' comment: {text[:90]}")
    if bad:
        print(f"check_any: {bad} unexplained uses of Any; type them, use banditgate.jsontypes, or say which "
              f"third-party API is untyped in a '# Any:' comment")
        return 1
    print("check_any: every Any is explained")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
