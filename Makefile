# Shortcuts for the scripts in scripts/ (README.md gives the two set-up commands).
.PHONY: setup demo test bench
setup:
	bash scripts/setup-env.sh
demo:
	bash scripts/run-demo.sh
test:
	bash scripts/run-tests.sh
bench: setup
	for b in benchmarks/bench_*.py; do .venv/bin/python $$b --quick; done
