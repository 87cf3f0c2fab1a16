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
# BENCH_CPUS (CPUs for the bench executors, default the last one), SERVER_ARGS (extra --set
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
SERVER_ARGS=${SERVER_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:-}
PERF_EVENTS=${PERF_EVENTS:-}
BUILD=${BUILD:-1}
TRANSPORT=${TRANSPORT:-websocket}
ncpu=$(nproc)
BENCH_CPUS=${BENCH_CPUS:-$((ncpu - 1))}

export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/models/onnxruntime/libonnxruntime.so.1.31.1}
export XIAOZHI_MODELS=${XIAOZHI_MODELS:-$PWD/models}

# The server still runs VAD locally (Silero on the inference core); ASR, LLM and TTS are remote.
scripts/setup.sh apt runtime vad
if [ "$BUILD" = 1 ]; then
  cargo build --release --bin xiaozhi-tpc -p xiaozhi-tpc
  cargo build --release --bin xiaozhi-bench -p xiaozhi-bench
fi
SERVER=${SERVER:-target/release/xiaozhi-tpc}
BENCH=${BENCH:-target/release/xiaozhi-bench}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK_PORT=$(free_port)
WS_PORT=$(free_port)
HTTP_PORT=$(free_port)
MQTT_PORT=$(free_port)
mkdir -p "$OUT"

# MQTT + UDP: the server hands every device MQTT credentials in its OTA answer; the bench's
# devices ask OTA first, then CONNECT and speak over UDP (one port per shard, chosen freely).
transport_server=()
transport_bench=()
if [ "$TRANSPORT" = mqtt ]; then
  transport_server=(--set mqtt.enabled=true --set "mqtt.port=$MQTT_PORT" --set mqtt.udp_port_base=0
    --set 'mqtt.signature_keys=["standard-bench-key"]' --set 'mqtt.ota_transport="mqtt"')
  transport_bench=(--transport mqtt --ota-url "http://127.0.0.1:$HTTP_PORT/xiaozhi/ota/")
fi

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$BENCH" mock-upstream --port "$MOCK_PORT" \
  --asr-ms 50 --llm-first-token-ms 100 --llm-token-ms 10 --tts-ms 50 --tts-audio-ms 400 \
  >"$OUT/mock-upstream.log" 2>&1 &
pids+=($!)

base="http://127.0.0.1:$MOCK_PORT/v1"
# shellcheck disable=SC2086 # SERVER_ARGS is a list of flags
"$SERVER" serve \
  --set server.ip=127.0.0.1 --set "server.port=$WS_PORT" --set "server.http_port=$HTTP_PORT" \
  --set 'asr.provider="openai"' --set "asr.openai.base_url=\"$base\"" \
  --set 'llm.provider="openai"' --set "llm.openai.base_url=\"$base\"" \
  --set 'tts.provider="openai"' --set "tts.openai.base_url=\"$base\"" \
  --set "metrics.dump_dir=\"$OUT/server-histograms\"" \
  "${transport_server[@]}" $SERVER_ARGS >"$OUT/server.log" 2>&1 &
server_pid=$!
pids+=("$server_pid")

healthy() { python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$HTTP_PORT/healthz" 2>/dev/null; }
for _ in $(seq 1 200); do
  if healthy; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "the server exited; its log:" >&2; tail -n 30 "$OUT/server.log" >&2; exit 1
  fi
  sleep 0.1
done
healthy || { echo "the server did not become healthy; its log: $OUT/server.log" >&2; exit 1; }

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "server pid $server_pid (ws :$WS_PORT, http :$HTTP_PORT, transport $TRANSPORT); mock upstream :$MOCK_PORT; bench on CPU(s) $BENCH_CPUS"
grep -m1 "core plan" "$OUT/server.log" || true

# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
"$BENCH" sweep --steps "$STEPS" --server-pid "$server_pid" \
  --metrics-url "http://127.0.0.1:$HTTP_PORT/metrics" \
  --url "ws://127.0.0.1:$WS_PORT/xiaozhi/v1/" "${transport_bench[@]}" \
  --interactions "$INTERACTIONS" --think-ms 500 --expected-reply-ms 2500 --ramp-s 3 \
  --cores "$(tr ',' '\n' <<<"$BENCH_CPUS" | wc -l)" --cpus "$BENCH_CPUS" \
  ${PERF_EVENTS:+--perf-events "$PERF_EVENTS"} \
  $BENCH_ARGS --out "$OUT"

# Stop the server (SIGTERM drains and writes its histograms into $OUT/server-histograms).
kill -TERM "$server_pid"
wait "$server_pid" || true
echo "server histograms: $OUT/server-histograms/"
