.PHONY: setup train test bench
setup:
	bash scripts/setup_env.sh
train:
	bash scripts/train.sh
test:
	bash scripts/test.sh
bench:
	bash scripts/setup_env.sh && .venv/bin/python -m pytest benchmarks --benchmark-only --benchmark-json benchmarks/results/cpu-latest.json
