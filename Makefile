# The two commands: `make run` brings everything up, `make test` runs the tests.
.PHONY: run test lint bench image services

run:
	tools/run.sh

test:
	tools/test.sh $(ARGS)

lint:
	.venv/bin/ruff check . && .venv/bin/lint-imports

image:
	tools/build-tiny-image.sh var/images/tiny.qcow2

services:
	tools/services.sh start
