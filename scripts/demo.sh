#!/usr/bin/env bash
# Set up (idempotent) and run the all-in-one demo: embedded broker + Redis + simulator + daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
exec .venv/bin/streamtrain demo "$@"
