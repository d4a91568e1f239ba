#!/usr/bin/env bash
# Idempotent set-up: .venv + pinned dependencies + redis-server (+ promtool, docker-compose for tests).
# Usage: scripts/setup.sh [demo|test]
# A second run is fast: pip runs only when pyproject.toml / constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-demo}"
case "$profile" in demo|test) ;; *) echo "usage: $0 [demo|test]" >&2; exit 2 ;; esac

say() { printf '[setup] %s\n' "$*" >&2; }

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  say "need Python >= 3.10 as '$PYTHON' (set PYTHON=/path/to/python3.x)"; exit 1
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi

extras=""; [ "$profile" = test ] && extras="[test]"
stamp=".setup-stamp-$profile"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python dependencies ($profile)"
  .venv/bin/python -m pip install -q --upgrade pip
  # constraints.txt pins torch to the local CPU build here; edit it on GPU hosts.
  .venv/bin/python -m pip install -q -c constraints.txt -e ".$extras"
  echo "$want" > "$stamp"
fi

need_pkgs=()
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
[ "$profile" = test ] && ! command -v promtool >/dev/null && need_pkgs+=(prometheus)
# `docker-compose config` parses compose/docker-compose.yml in the tests; no engine is needed
[ "$profile" = test ] && ! command -v docker-compose >/dev/null && need_pkgs+=(docker-compose)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${need_pkgs[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >/dev/null; }
  else
    for p in "${need_pkgs[@]}"; do
      case "$p" in
        redis-server) say "redis-server is missing: install it (sudo apt-get install redis-server / brew install redis) and re-run"; exit 1 ;;
        prometheus) say "promtool is missing: the metrics lint and alert rule tests will be skipped (sudo apt-get install prometheus to run them)" ;;
        docker-compose) say "docker-compose is missing: the compose parse test will be skipped (sudo apt-get install docker-compose to run it)" ;;
      esac
    done
  fi
fi
