# Two commands do all set-up on a fresh machine: `make quickstart` (the main job) and `make test`.
# Both build .venv with the pinned, tested set (constraints.txt) on first use.
PY := .venv/bin/python

.PHONY: venv quickstart test lint clean

venv:
	@bash scripts/bootstrap.sh

quickstart: venv
	$(PY) train.py --config configs/quickstart/vit_digits_2of4.yaml --output output --experiment quickstart

test: venv
	@bash scripts/run_tests.sh

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf .venv output .pytest_cache
