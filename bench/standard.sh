#!/usr/bin/env bash
# The standard scenario (bench/README.md): our server with every provider on the mock upstream
# (ASR 50 ms; LLM first token 100 ms then 10 ms per token; TTS 50 ms returning 400 ms of audio
# per segment), a ~1.8 s English utterance, 0.5 s think time, swept over fleet sizes.
#
#   make bench                                   # or: bench/standard.sh
#   STEPS=1,20,50,100 INTERACTIONS=8 make bench
#   TRANSPORT=mqtt bench/standard.sh             # the same over MQTT + UDP (credentials via OTA)
#
# Knobs (environment): STEPS (fleet sizes), INTERACTIONS (per device), OUT (folder),
# TRANSPORT (websocket or mqtt),
# BENCH_CPUS (CPUs for the bench executors, default the last one), MOCK_CPUS (CPUs for the
# mock upstream; default unpinned), SERVER_ARGS (extra --set
# flags for the server), BUILD=0 (use the binaries already in target/release), SERVER / BENCH
# (other binaries, e.g. an older build to compare against), BENCH_ARGS (extra flags for the
# sweep, e.g. "--uplink-floor silence"), PERF_EVENTS (kernel events of the server counted per
# interaction with perf stat, e.g.
# syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_futex,context-switches).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-1,10,25,50,100}
INTERACTIONS=${INTERACTIONS:-6}
OUT=${OUT:-bench/out/standard}
BENCH_ARGS=${BENCH_ARGS:-}
PERF_EVENTS=${PERF_EVENTS:-}
ncpu=$(nproc)
BENCH_CPUS=${BENCH_CPUS:-$((ncpu - 1))}

# shellcheck source=bench/mock-server.sh
. bench/mock-server.sh
echo "bench on CPU(s) $BENCH_CPUS"

# MQTT + UDP: the bench's devices ask OTA first, then CONNECT and speak over UDP.
transport_bench=()
if [ "$TRANSPORT" = mqtt ]; then
  transport_bench=(--transport mqtt --ota-url "http://127.0.0.1:$HTTP_PORT/xiaozhi/ota/")
fi

# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
"$BENCH" sweep --steps "$STEPS" --server-pid "$SERVER_PID" \
  --metrics-url "http://127.0.0.1:$HTTP_PORT/metrics" \
  --url "ws://127.0.0.1:$WS_PORT/xiaozhi/v1/" "${transport_bench[@]}" \
  --interactions "$INTERACTIONS" --think-ms 500 --expected-reply-ms 2500 --ramp-s 3 \
  --cores "$(tr ',' '\n' <<<"$BENCH_CPUS" | wc -l)" --cpus "$BENCH_CPUS" \
  ${PERF_EVENTS:+--perf-events "$PERF_EVENTS"} \
  $BENCH_ARGS --out "$OUT"

stop_server
