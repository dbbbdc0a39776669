.PHONY: setup test demo unit

# Install and start PostgreSQL + RabbitMQ (STOMP), create .venv and install golconde into it.
setup:
	bash scripts/setup.sh

# Full suite (sets everything up first). Extra pytest arguments: make test ARGS="-k foo"
test:
	bash scripts/test.sh $(ARGS)

demo:
	bash scripts/demo.sh $(ARGS)

# Unit tests only: needs the venv, not the services.
unit:
	bash scripts/setup-python.sh
	.venv/bin/python -m pytest tests/unit -q -ra $(ARGS)
