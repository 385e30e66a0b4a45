#!/usr/bin/env bash
# The main job: boot a parent sandbox, warm it (an expensive "model load" and a
# long-running process holding state in memory), BRANCH it live while it keeps
# working, spawn children from the branch, and run a command in each: every
# child already has the warm state, without re-running anything, and the
# parent never stopped for more than a few milliseconds. Prints the timings.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
F=./target/release/forkd
N=${N:-4}
TAG=demo-$$
ms() { python3 -c "import json,sys; print(round(json.load(sys.stdin)['$1']))"; }
cleanup() { $F kill $($F ls --json | python3 -c "import json,sys; print(' '.join(s['id'] for s in json.load(sys.stdin) if s['id'] in '''${IDS:-}'''.split()))") >/dev/null 2>&1 || true; $F rmi --force "$TAG" >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== boot a parent sandbox"
OUT=$($F create --json); PARENT=$(echo "$OUT" | python3 -c "import json,sys; print(json.load(sys.stdin)['id'])")
IDS="$PARENT"
echo "   $PARENT booted in $(echo "$OUT" | ms boot_ms) ms"

echo "== warm it: load a 'model' (slow), start a server process that holds state"
T0=$(date +%s%N)
$F exec "$PARENT" -- sh -c '
  i=0; while [ $i -lt 40 ]; do head -c 1048576 /dev/urandom; i=$((i+1)); done > /tmp/model.bin
  md5sum /tmp/model.bin | cut -d" " -f1 > /tmp/model.md5
  (n=0; while :; do n=$((n+1)); echo "$n" > /tmp/served; sleep 0.2; done) >/dev/null 2>&1 &
  echo $! > /tmp/server.pid
  echo "   model $(cat /tmp/model.md5) loaded, server pid $(cat /tmp/server.pid)"'
echo "   warm-up took $(( ($(date +%s%N) - T0) / 1000000 )) ms"

echo "== BRANCH it live while it works (the server keeps counting)"
OUT=$($F branch "$PARENT" --tag "$TAG" --json)
echo "$OUT" | python3 -c "
import json,sys; d=json.load(sys.stdin)
print('   parent paused %.1f ms; the branch streamed out while it ran and was ready in %.0f ms' % (d['pause_ms'], d['ready_ms']))"
echo "   parent still serving: $($F exec "$PARENT" -- cat /tmp/served) requests"

echo "== spawn $N copy-on-write children from the branch"
OUT=$($F spawn "$TAG" -n "$N" --json)
KIDS=$(echo "$OUT" | python3 -c "import json,sys; print(' '.join(c['sandbox']['id'] for c in json.load(sys.stdin)['children'] if 'sandbox' in c))")
IDS="$IDS $KIDS"
echo "$OUT" | python3 -c "
import json,sys; d=json.load(sys.stdin)
for c in d['children']:
    print('   %s ready in %.0f ms (device state loaded in %.0f ms)' % (c['sandbox']['id'], c['ready_ms'], c['restore_ms']) if 'sandbox' in c else '   failed: ' + c['error'])
print('   all %d ready in %.0f ms' % (len(d['children']), d['wall_ms']))"

echo "== run a command in each child"
for K in $KIDS; do
  T0=$(date +%s%N)
  R=$($F exec "$K" -- sh -c 'echo "$(hostname): model $(md5sum /tmp/model.bin | cut -c1-8) (warm copy, not recomputed), server pid $(cat /tmp/server.pid) alive: $(kill -0 $(cat /tmp/server.pid) && echo yes), served $(cat /tmp/served)"')
  echo "   $R  [exec $(( ($(date +%s%N) - T0) / 1000000 )) ms]"
done
