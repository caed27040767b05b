# Two commands do all the set-up on a fresh machine:
#   make test   create .venv, install the project with its test extras, lint, import contracts, tests
#   make demo   create .venv, install, run the embedded default pipeline (dvc repro on synthetic twins)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# the install lists every package it adds with V=1 (make install V=1); one summary line otherwise
QUIET := $(if $(V),,-q)
# uv is much faster than pip but ignores pip's config: give it the local wheel folder when it exists.
# --compile-bytecode: uv, unlike pip, leaves the packages uncompiled, and where PYTHONDONTWRITEBYTECODE is set
# (as on the machines this project is tested on) every process compiles torch, mlflow, dvc, ... from source: 10-25 s
# more per pipeline stage and per CLI call the tests make. The project's own packages are compiled once too.
PROJECT_PACKAGES := pipelines models data cuda_ops
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# the container image (tools/build_image.py): where /opt/wheels holds the CPU torch, the image takes it
IMAGE ?= localhost/vitadapter:0.1.0
IMAGE_WHEELS := $(if $(wildcard /opt/wheels),--wheels /opt/wheels,)

# the tools' telemetry stays off; the pipeline's commands come from the venv
RUN_ENV := PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
	PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="$(CURDIR)/artifacts/prefect-home"

.PHONY: install lint format contracts test test-slow demo shell clean help image image-lock k8s-template

help:
	@echo "make demo      install into $(VENV) and run the whole pipeline (dvc repro) on the embedded default"
	@echo "make test      install into $(VENV) and run lint, import contracts and the default (CPU) tests"
	@echo "make test-slow the slow tests (large zoo models)"
	@echo "make lint      ruff check and format check"
	@echo "make format    ruff format and autofix"
	@echo "make shell     a shell with the project's environment (vitadapter, dvc, mlflow, prefect on PATH)"
	@echo "make image     build the container image with buildah and smoke-test it inside ($(IMAGE))"
	@echo "make image-lock  re-lock the image's dependencies (deploy/image/requirements.lock, from PyPI)"
	@echo "make k8s-template  regenerate deploy/kubernetes/base-job-template.json from Prefect's default"
	@echo "make clean     remove the virtual environment and caches"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "installing the project and its dependencies into $(VENV) (uv; 'make install V=1' lists the packages)"
	@$(BIN)/python -m pip install -q --upgrade uv 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@if [ -x $(BIN)/uv ] && $(BIN)/uv pip install $(QUIET) --compile-bytecode --python $(BIN)/python $(FIND_LINKS) -e ".[test]"; then \
		echo "installed with uv: $$($(BIN)/uv pip list --python $(BIN)/python 2>/dev/null | tail -n +3 | wc -l) packages in $(VENV)"; \
	else \
		echo "uv unavailable or failed: installing with pip"; \
		$(BIN)/python -m pip install $(QUIET) -e ".[test]"; \
	fi
	@$(BIN)/python -m compileall -q $(PROJECT_PACKAGES) > /dev/null
	@touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

contracts: install
	$(BIN)/lint-imports

test: lint contracts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

demo: install
	@mkdir -p artifacts/prefect-home
	$(RUN_ENV) $(BIN)/dvc repro
	@$(RUN_ENV) $(BIN)/vitadapter pipeline plots --out artifacts/plots \
		|| echo "(offline training-curve page skipped: it needs npm once to fetch vega)"
	@echo
	@echo "Done. The comparison with the published table: artifacts/reports/report.md"
	@echo "Metrics: metrics/ (dvc metrics show); training curves: artifacts/plots/index.html"
	@echo "The MLflow UI (start the server, then open the address: our runs beside the published numbers):"
	@sed -n 's/^- experiment `\(.*\)`: /  \1: /p' artifacts/reports/report.md
	@echo "The commands (vitadapter, dvc, mlflow, prefect) are in $(BIN): run 'make shell' or 'source $(BIN)/activate'"

shell: install
	@echo "entering a shell with $(VENV) activated (exit to leave)"
	@$(RUN_ENV) VIRTUAL_ENV="$(CURDIR)/$(VENV)" $${SHELL:-bash} -i

# needs root and buildah (debootstrap too where no registry gives the base); the script needs no venv
image:
	$(PYTHON) tools/build_image.py --tag $(IMAGE) $(IMAGE_WHEELS)

# linux x86_64, CPython 3.11, PyPI only (so torch is the CUDA build and its nvidia-* libraries are pinned)
image-lock: install
	$(BIN)/uv pip compile pyproject.toml deploy/image/build-requirements.in --extra k8s \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -q -o deploy/image/requirements.lock

k8s-template: install
	$(BIN)/python tools/k8s_job_template.py --write

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
