# The two entry points of the README, plus their pieces. Every target sets up what it needs
# (cluster/bootstrap.sh is idempotent and fast once the machine has its venv).
SHELL := /bin/bash
ENV := source cluster/env.sh &&
TOKENIZER := ../shared/data/tokenizers/deberta-v3-base/tokenizer.json
CORPUS := ../shared/data/corpus

.PHONY: demo test bootstrap build lint slurm-up slurm-down bench-cpu-forward bench-data

bootstrap:
	bash cluster/bootstrap.sh

build: bootstrap
	$(ENV) cargo build --release --bin deberta --bin deberta-worker

# The main job: preprocess the shared corpora with the DeBERTa-v3 tokenizer, then pretrain a
# small DeBERTa on the CPU with 4 MPI ranks (tensor 2 x data 2): TensorBoard events, metrics and
# checkpoints in runs/cpu-demo/.
demo: build
	mkdir -p runs/data
	$(ENV) ./target/release/deberta preprocess --tokenizer $(TOKENIZER) --output-prefix runs/data/train \
		--input $(CORPUS)/tinyshakespeare.txt $(CORPUS)/wikitext2_valid.tokens.txt
	$(ENV) ./target/release/deberta preprocess --tokenizer $(TOKENIZER) --output-prefix runs/data/valid \
		--input $(CORPUS)/wikitext2_test.tokens.txt
	rm -rf runs/cpu-demo
	$(ENV) ./target/release/deberta train configs/cpu-demo.yaml

lint: bootstrap
	$(ENV) cargo fmt --all -- --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings

# The one-node SLURM the SLURM test submits to (idempotent; ~15 s the first time, then 0.1 s).
slurm-up:
	bash cluster/slurm-local/up.sh

slurm-down:
	bash cluster/slurm-local/down.sh

# Everything CI runs. nextest (on the machine image) ends with one summary line for all crates
# and runs each test in its own process; plain `cargo test` is the fallback where it is missing,
# one test at a time: libtorch's random generator is one per process, so tests that seed it
# must not draw in parallel threads.
test: lint slurm-up
	$(ENV) if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --workspace --no-fail-fast; \
	else \
		cargo test --workspace --no-fail-fast -- --test-threads=1; \
	fi

# CPU forward of the base preset against HF transformers' eager forward in the same run.
bench-cpu-forward: build
	$(ENV) python3 bench/cpu_forward_vs_hf.py

# Preprocess throughput vs Python tokenizers, and loader + masking tokens/s on one core.
bench-data: build
	$(ENV) python3 bench/data_pipeline.py
