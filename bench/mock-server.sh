# Sourced by bench/standard.sh, neighbour.sh and soak.sh: starts the mock upstream and our
# release server on it (free ports), waits until the server is healthy, and stops both on exit.
# Sets SERVER_PID, WS_PORT, HTTP_PORT, MOCK_PORT, SERVER, BENCH. Needs OUT; reads SERVER_ARGS, MOCK_CPUS,
# BUILD (1 = build the release binaries first) and SETUP (1 = scripts/setup.sh for VAD).
SERVER_ARGS=${SERVER_ARGS:-}
BUILD=${BUILD:-1}
SETUP=${SETUP:-1}

export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/models/onnxruntime/libonnxruntime.so.1.31.1}
export XIAOZHI_MODELS=${XIAOZHI_MODELS:-$PWD/models}

# The server still runs VAD locally (Silero on the inference core); ASR, LLM and TTS are remote.
if [ "$SETUP" = 1 ]; then scripts/setup.sh apt runtime vad; fi
if [ "$BUILD" = 1 ]; then
  cargo build --release --bin xiaozhi-tpc -p xiaozhi-tpc
  cargo build --release --bin xiaozhi-bench -p xiaozhi-bench
fi
SERVER=${SERVER:-target/release/xiaozhi-tpc}
BENCH=${BENCH:-target/release/xiaozhi-bench}
TRANSPORT=${TRANSPORT:-websocket}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK_PORT=$(free_port)
WS_PORT=$(free_port)
HTTP_PORT=$(free_port)
while [ "$HTTP_PORT" = "$WS_PORT" ] || [ "$HTTP_PORT" = "$MOCK_PORT" ]; do HTTP_PORT=$(free_port); done
while [ "$WS_PORT" = "$MOCK_PORT" ]; do WS_PORT=$(free_port); done
MQTT_PORT=$(free_port)
while [ "$MQTT_PORT" = "$WS_PORT" ] || [ "$MQTT_PORT" = "$HTTP_PORT" ] || [ "$MQTT_PORT" = "$MOCK_PORT" ]; do
  MQTT_PORT=$(free_port)
done
mkdir -p "$OUT"

# MQTT + UDP: the server hands every device MQTT credentials in its OTA answer (one UDP port
# per shard, chosen freely).
transport_server=()
if [ "$TRANSPORT" = mqtt ]; then
  transport_server=(--set mqtt.enabled=true --set "mqtt.port=$MQTT_PORT" --set mqtt.udp_port_base=0
    --set 'mqtt.signature_keys=["standard-bench-key"]' --set 'mqtt.ota_transport="mqtt"')
fi

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# MOCK_CPUS pins the mock upstream (a thread per connection) to these CPUs, e.g. the bench's,
# so it does not run on the shard's core; empty (default) leaves it to the scheduler.
mock_pin=()
if [ -n "${MOCK_CPUS:-}" ]; then mock_pin=(taskset -c "$MOCK_CPUS"); fi
"${mock_pin[@]}" "$BENCH" mock-upstream --port "$MOCK_PORT" \
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
SERVER_PID=$!
pids+=("$SERVER_PID")

healthy() { python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$HTTP_PORT/readyz" 2>/dev/null; }
for _ in $(seq 1 200); do
  if healthy; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "the server exited; its log:" >&2; tail -n 30 "$OUT/server.log" >&2; exit 1
  fi
  sleep 0.1
done
healthy || { echo "the server did not become healthy; its log: $OUT/server.log" >&2; exit 1; }

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/{print $2}') GiB; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "server pid $SERVER_PID (ws :$WS_PORT, http :$HTTP_PORT, transport $TRANSPORT); mock upstream :$MOCK_PORT"
grep -m1 "core plan" "$OUT/server.log" || true

# Stops the server with SIGTERM (it drains and writes its histograms into $OUT/server-histograms).
stop_server() {
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  echo "server histograms: $OUT/server-histograms/"
}
