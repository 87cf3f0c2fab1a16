#!/usr/bin/env bash
# The noisy-neighbour scenario (issue 12; bench/README.md "neighbour"): the standard scenario's
# server and mock upstream, DEVICES good devices without and with one abusive device of each
# kind, ROUNDS alternating pairs per kind.
#
#   bench/neighbour.sh
#   DEVICES=20 INTERACTIONS=10 ROUNDS=2 ABUSERS=text-flood,iot-flood bench/neighbour.sh
#
# Knobs (environment): ABUSERS, DEVICES, INTERACTIONS, ROUNDS, OUT, BENCH_CPUS, ABUSER_CPU
# (default unpinned), SERVER_ARGS, BUILD=0, SETUP=0 (as bench/standard.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

ABUSERS=${ABUSERS:-text-flood,iot-flood,frame-flood,metrics-hammer}
DEVICES=${DEVICES:-20}
INTERACTIONS=${INTERACTIONS:-6}
ROUNDS=${ROUNDS:-1}
OUT=${OUT:-bench/out/neighbour}
ncpu=$(nproc)
BENCH_CPUS=${BENCH_CPUS:-$((ncpu - 1))}
ABUSER_CPU=${ABUSER_CPU:-}

# shellcheck source=bench/mock-server.sh
. bench/mock-server.sh

"$BENCH" neighbour --abuser "$ABUSERS" --rounds "$ROUNDS" \
  --http-url "http://127.0.0.1:$HTTP_PORT" ${ABUSER_CPU:+--abuser-cpu "$ABUSER_CPU"} \
  --url "ws://127.0.0.1:$WS_PORT/xiaozhi/v1/" --devices "$DEVICES" \
  --interactions "$INTERACTIONS" --think-ms 500 --expected-reply-ms 2500 --ramp-s 3 \
  --cores "$(tr ',' '\n' <<<"$BENCH_CPUS" | wc -l)" --cpus "$BENCH_CPUS" \
  --out "$OUT"

stop_server
