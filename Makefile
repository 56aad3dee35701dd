# Two commands set everything up from a fresh machine, each installing what it needs:
# `make demo` the Python package alone (no root, no apt, no npm); `make test` also the test tools,
# the browser, the JDK and the npm packages the browser and Java tests use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Installs the pinned packages: uv (itself pinned, from PyPI) sets up a fresh venv in ~45 s where pip
# takes ~135 s (the same 131 packages, mostly torch's CUDA wheels, compiled to bytecode as pip does:
# processes here do not write .pyc files); pip stays the fallback.
define pinned_install
	{ $(PY) -m pip install --quiet -c constraints.txt uv && \
	  $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt $(1); } || \
	$(PY) -m pip install --quiet -c constraints.txt $(1)
endef

# Reinstall when the project's dependencies or their pins change.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(call pinned_install,-e .)
	touch $(STAMP)

# The package with the test and lint tools (pytest, ruff, mypy, ray): the [dev] extra, in one install
# (a second one resolving the package again costs time), which also stands for the package alone.
$(DEV_STAMP): pyproject.toml constraints.txt | $(PY)
	$(call pinned_install,-e '.[dev]')
	touch $(STAMP) $(DEV_STAMP)

# Browser tests: Debian's chromium driven by playwright-core (never a downloaded browser).
BROWSER_DEPS := tests/browser/node_modules/.package-lock.json
$(BROWSER_DEPS): tests/browser/package-lock.json
	command -v chromium >/dev/null || { apt-get update && apt-get install -y chromium; }
	cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund
	touch $(BROWSER_DEPS)

# The Java protocol client (android_demo/fedclient) is tested on the JVM: JUnit 5 and org.json from Debian.
JAVA_DEPS := /usr/share/java/junit-platform-console-standalone.jar
$(JAVA_DEPS):
	command -v javac >/dev/null || { apt-get update && apt-get install -y openjdk-17-jdk-headless; }
	dpkg -s junit5 libandroid-json-java >/dev/null 2>&1 || { apt-get update && apt-get install -y junit5 libandroid-json-java; }

# The zero-install web phone: onnxruntime-web from the npm registry, served by our server (no CDN).
WEB_DEPS := android_demo/web/node_modules/.package-lock.json
$(WEB_DEPS): android_demo/web/package-lock.json
	cd android_demo/web && npm ci --ignore-scripts --no-audit --no-fund
	touch $(WEB_DEPS)

# Everything the tests need (the browser and the JDK come from apt: root on a fresh machine).
install: $(DEV_STAMP) $(BROWSER_DEPS) $(JAVA_DEPS) $(WEB_DEPS)

demo: $(STAMP)
	$(VENV)/bin/fedfleet simulate

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check server device_runtime export protocol fedfleet tests bench
	$(VENV)/bin/mypy fedfleet tests

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: install lint
	$(PY) -m pytest -q -ra -n 2 --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs
