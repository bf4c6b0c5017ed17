#!/usr/bin/env bash
# Print the path of a `helm` binary, installing the pinned version from its Go module first when
# there is none: the `helm` on PATH if any, else $BANDITGATE_TOOLS_DIR (default
# ~/.cache/banditgate/tools)/helm-<version>/helm, built with `go install` (minutes of CPU once; the
# Go module cache makes later builds quick). Used by .ci/run and tests/deploy (docs/deploy.md).
# Exits 1 with one line on stderr when there is no helm and no Go toolchain to build it.
set -euo pipefail
version=v3.21.4
if command -v helm >/dev/null 2>&1; then
  command -v helm
  exit 0
fi
dir="${BANDITGATE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/banditgate/tools}/helm-$version"
if [ -x "$dir/helm" ]; then
  echo "$dir/helm"
  exit 0
fi
go=$(command -v go || true)
[ -n "$go" ] || { [ -x /usr/local/go/bin/go ] && go=/usr/local/go/bin/go; } || true
if [ -z "$go" ]; then
  echo "helm.sh: no helm on PATH and no Go toolchain to build helm $version (install Go or helm)" >&2
  exit 1
fi
mkdir -p "$dir"
echo "helm.sh: building helm $version with $go into $dir (a few minutes, once)" >&2
log="$dir/install.log"
if ! GOBIN="$dir" "$go" install "helm.sh/helm/v3/cmd/helm@$version" >"$log" 2>&1; then
  echo "helm.sh: go install helm.sh/helm/v3/cmd/helm@$version failed: $(tail -n 1 "$log")" >&2
  exit 1
fi
echo "$dir/helm"
