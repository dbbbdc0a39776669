.PHONY: setup test demo unit bench chaos

# Install and start PostgreSQL + RabbitMQ (STOMP), create .venv and install golconde into it.
setup:
	bash scripts/setup.sh

# Full suite (sets everything up first). Extra pytest arguments: make test ARGS="-k foo"
test:
	bash scripts/test.sh $(ARGS)

demo:
	bash scripts/demo.sh $(ARGS)

# Benchmark (bench/README.md): make bench ARGS="--quick" or ARGS="--runs 3 --json var/bench.json"
bench:
	bash bench/run.sh $(ARGS)

# Reliability suite at full size (chaos/README.md): make chaos ARGS="--scenarios kill --flows client"
chaos:
	bash scripts/setup.sh
	.venv/bin/python chaos/run.py $(ARGS)

# Unit tests only: needs the venv, not the services.
unit:
	bash scripts/setup-python.sh
	.venv/bin/python -m pytest tests/unit -q -ra $(ARGS)
