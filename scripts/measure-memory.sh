#!/usr/bin/env bash
# Memory per idle and per talking session, and sessions per shard (SO_REUSEPORT spread), as
# reported in tuning.md. Uses the built binaries (BIN=target/release or target/debug), remote
# providers answered by `xiaozhi-bench mock-upstream`, loopback ports 28000/28003/28080.
#
#   scripts/measure-memory.sh [IDLE_DEVICES] [TALKING_DEVICES...]
#   BIN=target/debug scripts/measure-memory.sh 2000 20 40
set -euo pipefail
BIN=${BIN:-target/release}
IDLE=${1:-2000}
shift || true
TALKING=("${@:-20}")
OUT=${OUT:-bench/out/memory}
mkdir -p "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# User + system CPU time of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

"$BIN/xiaozhi-bench" mock-upstream --port 28080 >"$OUT/mock.log" 2>&1 &
PIDS+=($!)

start_server() {
  local base='"http://127.0.0.1:28080/v1"'
  "$BIN/xiaozhi-tpc" serve --set server.ip=127.0.0.1 --set server.port=28000 \
    --set server.http_port=28003 --set log.level=warn \
    --set 'runtime.shard_cores=[0,1]' --set 'runtime.inference_cores=[1]' \
    --set asr.provider=openai --set llm.provider=openai --set tts.provider=openai \
    --set "asr.openai.base_url=$base" --set "llm.openai.base_url=$base" \
    --set "tts.openai.base_url=$base" >"$OUT/server.log" 2>&1 &
  SERVER=$!
  PIDS+=("$SERVER")
  for _ in $(seq 100); do
    curl -fs http://127.0.0.1:28003/readyz >/dev/null && return
    sleep 0.1
  done
  echo "server did not start" >&2
  exit 1
}

echo "== idle: $IDLE devices (hold), sessions per shard"
start_server
"$BIN/xiaozhi-bench" hold --url ws://127.0.0.1:28000/xiaozhi/v1/ --devices "$IDLE" --hold-s 4 \
  --server-pid "$SERVER" --out "$OUT" &
HOLD=$!
for _ in $(seq 600); do
  n=$(curl -fs http://127.0.0.1:28003/metrics | awk '/^xiaozhi_sessions\{/ {s+=$2} END {print s+0}')
  [ "$n" -ge "$IDLE" ] && break
  sleep 0.1
done
curl -fs http://127.0.0.1:28003/metrics | grep '^xiaozhi_sessions{'
wait "$HOLD"
kill "$SERVER"
wait "$SERVER" 2>/dev/null || true

for n in "${TALKING[@]}"; do
  echo "== talking: $n devices (fleet, remote mock providers)"
  start_server
  sleep 1
  base=$(rss_kib "$SERVER")
  cpu0=$(cpu_ticks "$SERVER")
  "$BIN/xiaozhi-bench" fleet --url ws://127.0.0.1:28000/xiaozhi/v1/ --devices "$n" \
    --duration-s 20 --ramp-s 2 --think-ms 500 --expected-reply-ms 2500 --cores 1 \
    --out "$OUT/fleet-$n" >"$OUT/fleet-$n.txt" 2>&1 &
  FLEET=$!
  peak=$base
  while kill -0 "$FLEET" 2>/dev/null; do
    r=$(rss_kib "$SERVER")
    [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.2
  done
  wait "$FLEET" || true
  cpu=$(($(cpu_ticks "$SERVER") - cpu0))
  grep -E '^devices|^errors' "$OUT/fleet-$n.txt" || true
  ok=$(sed -n 's/.*(ok \([0-9]*\),.*/\1/p' "$OUT/fleet-$n.txt")
  echo "server RSS before $base KiB, peak $peak KiB, per talking device $(((peak - base) / n)) KiB"
  echo "server CPU $((cpu * 1000 / $(getconf CLK_TCK))) ms for ${ok:-?} interactions"
  kill "$SERVER"
  wait "$SERVER" 2>/dev/null || true
done
