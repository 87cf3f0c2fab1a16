# shellcheck shell=sh
# scripts/env.sh — runtime environment for xiaozhi-tpc (models installed by scripts/setup.sh).
#   . scripts/env.sh            sourced (bash, or sh from the repo root): exports the variables
#   scripts/env.sh              executed: prints KEY=VALUE lines, e.g.
#                                 env $(scripts/env.sh) cargo test
#                                 Makefile: $(foreach kv,$(shell scripts/env.sh),$(eval export $(kv)))
# XIAOZHI_REPO overrides the repo root (default: the directory above this file, or $PWD when
# sourced by a shell that cannot tell where this file is).
if [ -n "${BASH_SOURCE:-}" ]; then _xz_self=$BASH_SOURCE; else _xz_self=$0; fi
case $_xz_self in
  */env.sh|env.sh) _xz_repo=$(cd "$(dirname "$_xz_self")/.." && pwd) ;;
  *) _xz_repo=$PWD ;;
esac
_xz_repo=${XIAOZHI_REPO:-$_xz_repo}

ORT_DYLIB_PATH=$_xz_repo/models/onnxruntime/libonnxruntime.so.1.31.1
XIAOZHI_MODELS=$_xz_repo/models

case ${0##*/} in
  env.sh)
    echo "ORT_DYLIB_PATH=$ORT_DYLIB_PATH"
    echo "XIAOZHI_MODELS=$XIAOZHI_MODELS" ;;
  *)
    export ORT_DYLIB_PATH XIAOZHI_MODELS ;;
esac
unset _xz_self _xz_repo
