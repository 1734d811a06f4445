# The two entry points of the README, plus their pieces. Every target sets up what it needs
# (cluster/bootstrap.sh is idempotent and fast once the machine has its venv).
SHELL := /bin/bash
ENV := source cluster/env.sh &&
FIXTURE := model/tests/fixtures/xxlarge_family
DEMO_DIR := runs/demo

.PHONY: demo test bootstrap build lint bench-cpu-forward bench-data

bootstrap:
	bash cluster/bootstrap.sh

build: bootstrap
	$(ENV) cargo build --release --bin deberta

# The main job (for now): describe the 1.5B model, then run a shipped checkpoint's forward pass.
demo: build
	$(ENV) ./target/release/deberta info --preset xxlarge
	mkdir -p $(DEMO_DIR)
	$(ENV) ./target/release/deberta forward --hf-dir $(FIXTURE) --ids $(FIXTURE)/ids.txt \
		--out $(DEMO_DIR)/forward.safetensors

lint: bootstrap
	$(ENV) cargo fmt --all -- --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings

# Everything CI runs. nextest (on the machine image) ends with one summary line for all crates;
# plain `cargo test` is the fallback where it is missing.
test: lint
	$(ENV) if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --workspace --no-fail-fast; \
	else \
		cargo test --workspace --no-fail-fast; \
	fi

# CPU forward of the base preset against HF transformers' eager forward in the same run.
bench-cpu-forward: build
	$(ENV) python3 bench/cpu_forward_vs_hf.py

# Preprocess throughput vs Python tokenizers, and loader + masking tokens/s on one core.
bench-data: build
	$(ENV) python3 bench/data_pipeline.py
