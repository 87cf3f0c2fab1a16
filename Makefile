# xiaozhi-tpc — the two set-up commands are `make run` and `make test`.
# Both install what they need first (idempotently: a second run downloads nothing).

SHELL := /bin/bash
CARGO ?= cargo
# Extra arguments for `make run`, e.g. make run ARGS="--set server.port=18000"
ARGS ?=
# Models and the ONNX Runtime library live in models/ (git-ignored), verified by scripts/assets.sha256.
export ORT_DYLIB_PATH := $(CURDIR)/models/onnxruntime/libonnxruntime.so.1.31.1
export XIAOZHI_MODELS := $(CURDIR)/models

RUN_GROUPS := apt runtime vad asr-tiny asr-base tts kokoro
TEST_GROUPS := apt runtime vad asr-tiny asr-base tts kokoro sdk

.PHONY: run test setup setup-test build lint fmt bench check-cargo

run: check-cargo
	scripts/setup.sh $(RUN_GROUPS)
	$(CARGO) build --release --bin xiaozhi-tpc
	./target/release/xiaozhi-tpc serve $(ARGS)

test: check-cargo
	scripts/setup.sh $(TEST_GROUPS)
	$(CARGO) test --workspace

setup:
	scripts/setup.sh $(RUN_GROUPS)

build: check-cargo setup
	$(CARGO) build --release --workspace

lint: check-cargo setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# The standard latency scenario swept over fleet sizes (bench/README.md); STEPS=1,10,50 etc.
bench: check-cargo
	bench/standard.sh

check-cargo:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs), then re-run"; exit 1; }
