#!/usr/bin/env bash
# Set up (idempotent), run the whole test suite, then prove no service process was left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
service_pids() { pgrep -f -- '(tansu-[0-9.]+ broker|redis-server 127\.0\.0\.1)' | sort || true; }
before="$(service_pids)"
status=0
.venv/bin/python -m pytest "$@" || status=$?
sleep 1
leftover="$(comm -13 <(echo "$before") <(service_pids) | grep . || true)"
if [ -n "$leftover" ]; then
  echo "ERROR: service processes left running after the tests:" >&2
  ps -o pid,cmd -p $(echo $leftover | tr ' ' ,) >&2 || true
  kill $leftover 2>/dev/null || true
  [ "$status" = 0 ] && status=1
fi
exit "$status"
