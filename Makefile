# blockd — the two commands a new user needs:
#   make run    set up, create volume vol0 (8 GiB) if missing, serve on 127.0.0.1:10809
#               (Prometheus metrics on http://127.0.0.1:9810/metrics)
#   make test   set up and run the whole test suite
VENV ?= .venv
BLOCKD = $(VENV)/bin/blockd
PYTEST = $(VENV)/bin/python -m pytest
LISTEN ?= 127.0.0.1:10809
METRICS ?= 127.0.0.1:9810

.PHONY: setup run test unit integration bench clean

setup:
	@./tools/setup

run: setup
	$(BLOCKD) volume create vol0 --size 8GiB --exist-ok
	exec $(BLOCKD) serve --listen $(LISTEN) --metrics $(METRICS)

test: setup
	$(PYTEST) -q tests

unit: setup
	$(PYTEST) -q tests/unit

integration: setup
	$(PYTEST) -q tests/integration

bench: setup
	$(VENV)/bin/python tools/bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
