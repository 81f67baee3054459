# The README's two commands: `make demo` (build the example servables and run them) and `make test`.
PYTHON ?= python3
SERVABLES ?= servables
STAMP := .venv-stamp
PROTOS := $(shell find runtime/protos -name '*.proto')

# Install, then generate the protobuf modules (runtime/protos/generated/, a build output): again
# whenever a .proto file or the generator changes.
$(STAMP): pyproject.toml $(PROTOS) runtime/protos/build.py
	# Debian's redis-server: the session store's tests run a real one.
	command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	# Debian's Java: the Spark integration's tests run Spark in local mode.
	command -v java >/dev/null || { apt-get update -qq && apt-get install -y -qq default-jre-headless; }
	# Debian's aarch64 cross compiler and QEMU user-mode: Graviton servables are built and tested here.
	command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu qemu-user; }
	# ray and spark share this environment (they change none of its versions); beam pins older pillow
	# and pyarrow, so its tests build a venv of their own (tests/engine_venv.py).
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[compile,dev,ray,spark]'
	# Test client only; it asks for the full tensorflow package, which tensorflow-cpu provides.
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps 'tensorflow-serving-api==2.21.*'
	$(PYTHON) -m runtime.protos.build
	touch $(STAMP)

setup: $(STAMP)

# Build the example servables, then serve them (REST on 8501, gRPC on 8500) until Ctrl-C.
demo: $(STAMP)
	$(PYTHON) examples/build.py $(SERVABLES)
	kiln inspect $(SERVABLES)/digits/1
	kiln predict $(SERVABLES)/half_plus_two/1 --input '{"instances": [1.0, 2.0, 5.0]}'
	kiln serve --model-repository $(SERVABLES) --rest-port 8501 --grpc-port 8500

# Lint and types first (configured in pyproject.toml), then the tests.
test: $(STAMP)
	$(PYTHON) -m ruff check runtime handlers warmpool
	$(PYTHON) -m ruff format --check runtime handlers warmpool
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -q -p no:cacheprovider

.PHONY: setup demo test
