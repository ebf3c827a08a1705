# Shortcuts for the scripts in scripts/ (README.md gives the two set-up commands).
.PHONY: setup demo test bench bench-quick
setup:
	bash scripts/setup-env.sh
demo:
	bash scripts/run-demo.sh
test:
	bash scripts/run-tests.sh
# Full-size benchmarks (minutes each); bench-quick runs the small sizes.
bench: setup
	.venv/bin/python benchmarks/bench_icfl_pursuit.py
	.venv/bin/python benchmarks/bench_topk.py
	.venv/bin/python benchmarks/bench_fit_memory.py
	bash scripts/with-display.sh .venv/bin/python benchmarks/bench_feature_selection.py
bench-quick: setup
	.venv/bin/python benchmarks/bench_icfl_pursuit.py --quick
	.venv/bin/python benchmarks/bench_topk.py --quick
	.venv/bin/python benchmarks/bench_fit_memory.py --quick
