#!/usr/bin/env bash
# Look at streamtrain as a person would: run `streamtrain demo` in a real terminal (tmux,
# 160x50) and capture the screen mid-run and at the end, then render the run's HTML report
# with headless Chromium to a PNG. Writes into runs/look/ (or $1):
#   terminal-live.txt  the screen while the demo runs: log lines above the live status panel
#   terminal-end.txt   the screen after it: the summary table
#   report.png         the report page as a browser draws it
# Needs tmux and chromium (Debian: apt-get install tmux chromium). Usage:
#   scripts/look.sh [OUT_DIR] [DEMO_SECONDS] [DEMO FLAGS...]   (PYTHON=/path/to/python picks the interpreter)
# e.g. a freeze to look at:
#   scripts/look.sh runs/look 60 --set 'simulator.drifts=[{kind: broken_feature, at_event: 15000, until_event: 30000}]'
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
out="$(realpath -m "${1:-runs/look}")"
seconds="${2:-45}"
shift $(( $# < 2 ? $# : 2 ))
demo_flags=""
[ "$#" -eq 0 ] || demo_flags="$(printf ' %q' "$@")"  # printf with no arguments would still print one empty word
python="${PYTHON:-$repo/.venv/bin/python}"
for tool in tmux chromium "$python"; do
  command -v "$tool" >/dev/null || { echo "look.sh: $tool is missing" >&2; exit 1; }
done
mkdir -p "$out"
rm -f "$out/demo.rc" "$out/terminal-live.txt" "$out/terminal-end.txt" "$out/report.png"
session="streamtrain-look-$$"
profile="$(mktemp -d)"
cleanup() { tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$profile"; }
trap cleanup EXIT

# The demo in a 160x50 terminal; the pane stays open after it so the end can be captured.
tmux new-session -d -s "$session" -x 160 -y 50 \
  "cd '$repo' && PYTHONPATH='$repo' '$python' -m streamtrain demo --duration $seconds --set run_dir='$out/run' $demo_flags; \
   echo \$? > '$out/demo.rc'; sleep 600"

wait_for() {  # wait_for SECONDS CONDITION...: poll until the condition holds
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}
screen_shows() { tmux capture-pane -p -t "$session" -S -500 | grep -F "$1" >/dev/null; }  # no -q: tmux must not get SIGPIPE
# Mid-run: once the daemon trains (its first AUC window is logged), halfway through, capture the screen.
wait_for 300 screen_shows "auc window" \
  || { echo "look.sh: the demo did not get going; screen:" >&2; tmux capture-pane -p -t "$session" >&2; exit 1; }
sleep $(( seconds / 2 ))
tmux capture-pane -p -t "$session" > "$out/terminal-live.txt"
wait_for $((seconds + 300)) test -s "$out/demo.rc" || { echo "look.sh: the demo did not finish" >&2; exit 1; }
tmux capture-pane -p -t "$session" > "$out/terminal-end.txt"
[ "$(cat "$out/demo.rc")" = 0 ] || { echo "look.sh: the demo exited $(cat "$out/demo.rc")" >&2; exit 1; }

# The report, drawn by a browser (a fresh profile; nothing but the file is loaded).
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size=1240,4000 --screenshot="$out/report.png" "file://$out/run/report/index.html" 2>/dev/null
test -s "$out/report.png"
echo "terminal (live):  $out/terminal-live.txt"
echo "terminal (end):   $out/terminal-end.txt"
echo "report page:      $out/report.png  (from $out/run/report/index.html)"
