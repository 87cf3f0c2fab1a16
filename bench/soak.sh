#!/usr/bin/env bash
# The soak (issue 12; bench/README.md "soak"): the standard scenario's server and mock upstream,
# DEVICES good devices talking for SOAK_S seconds beside one abuser per ABUSERS entry (each
# ON_S seconds abusing, OFF_S away), the server's RSS and open files sampled every 5 s into
# OUT/soak.csv; prints the RSS slope (MiB/h) and the open-file range.
#
#   bench/soak.sh                                  # 30 min, 20 good + text-flood, iot-flood
#   SOAK_S=300 ABUSERS=frame-flood bench/soak.sh
#
# Knobs (environment): SOAK_S, DEVICES, ABUSERS, ON_S, OFF_S, OUT, BENCH_CPUS, ABUSER_CPU,
# SERVER_ARGS, BUILD=0, SETUP=0 (as bench/standard.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

SOAK_S=${SOAK_S:-1800}
DEVICES=${DEVICES:-20}
ABUSERS=${ABUSERS:-text-flood,iot-flood}
ON_S=${ON_S:-10}
OFF_S=${OFF_S:-20}
OUT=${OUT:-bench/out/soak}
ncpu=$(nproc)
BENCH_CPUS=${BENCH_CPUS:-$((ncpu - 1))}
ABUSER_CPU=${ABUSER_CPU:-}

# shellcheck source=bench/mock-server.sh
. bench/mock-server.sh

"$BENCH" soak --server-pid "$SERVER_PID" --soak-s "$SOAK_S" --abusers "$ABUSERS" \
  --abuser-on-s "$ON_S" --abuser-off-s "$OFF_S" \
  --http-url "http://127.0.0.1:$HTTP_PORT" ${ABUSER_CPU:+--abuser-cpu "$ABUSER_CPU"} \
  --url "ws://127.0.0.1:$WS_PORT/xiaozhi/v1/" --devices "$DEVICES" \
  --think-ms 500 --expected-reply-ms 2500 --ramp-s 3 \
  --cores "$(tr ',' '\n' <<<"$BENCH_CPUS" | wc -l)" --cpus "$BENCH_CPUS" \
  --out "$OUT"

stop_server
