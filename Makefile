# fedhosp: `make demo` (install + run the 5-region federation), `make test` (install + tests).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# The environment itself lives outside the app folder, with .venv a symlink to it: every `flwr run .` walks
# each file under the app folder before filtering (Flower skips symlinked folders), and a venv's 50,000 files
# cost it about 9 s per run here.
VENV_STORE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/fedhosp/venv-$(shell printf %s "$(CURDIR)" | sha256sum | cut -c1-12)
# Our machines hold a CPU build of torch 2.13.0 on disk; GPU users may set TORCH_SPEC="torch" or their own.
TORCH_SPEC ?= torch==2.13.0
# The demo keeps its data, MLflow store and models inside the checkout (`make clean` removes them).
export FEDHOSP_HOME ?= $(CURDIR)/.fedhosp
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0

.PHONY: install system-deps demo test distclean bench bench-oncology bench-radiology bench-robustness bench-overhead bench-analysis bench-privacy bench-secure bench-decode bench-pacs bench-breastmnist deploy-local clean
SITES ?= 3
ROUNDS ?= 3
TASK ?= oncology

$(VENV_STORE)/.installed: pyproject.toml
	test -x $(VENV_STORE)/bin/python || { mkdir -p $(dir $(VENV_STORE)) && $(PYTHON) -m venv $(VENV_STORE); }
	$(VENV_STORE)/bin/python -m pip install -q --upgrade pip
	$(VENV_STORE)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV_STORE)/bin/python -m pip install -q -e '.[test]'
	if [ -d $(VENV) ] && [ ! -L $(VENV) ]; then echo "replacing the folder $(VENV) by a link to $(VENV_STORE)"; rm -rf $(VENV); fi
	ln -sfn $(VENV_STORE) $(VENV)
	touch $@

install: $(VENV_STORE)/.installed

# Debian packages the suite needs: headless Chromium opens the analysis report (tests/test_analysis_federation.py);
# Orthanc and its DICOMweb plugin are the PACS of tests/test_pacs.py, which starts its own Orthanc processes on free
# ports: Debian's service is kept from starting (a policy-rc.d that denies, only for the install, where none is).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
ORTHANC_DICOMWEB := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
system-deps:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="chromium"; \
	{ [ -x /usr/sbin/Orthanc ] && [ -e $(ORTHANC_DICOMWEB) ]; } || missing="$$missing orthanc orthanc-dicomweb"; \
	[ -z "$$missing" ] || { \
	  denied=""; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null \
	    && $(SUDO) chmod 755 /usr/sbin/policy-rc.d && denied=1; }; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  status=$$?; [ -z "$$denied" ] || $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$status; }

demo: install
	$(BIN)/fedhosp run --sites 5 $(ARGS)

test: install system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: bench-oncology bench-radiology bench-robustness bench-overhead bench-analysis bench-privacy bench-secure bench-decode bench-pacs bench-breastmnist

bench-oncology: install
	$(BIN)/python tests/bench_oncology.py $(ARGS)

bench-radiology: install
	$(BIN)/python tests/bench_radiology.py $(ARGS)

# The radiology defaults on real images: BreastMNIST (not in the project; BREASTMNIST=path) as DICOM at 3 sites,
# pooled vs site alone vs FedAvg (flwr run), AUC and accuracy per site and on the official test split.
BREASTMNIST ?= ../shared/data/breastmnist.npz
bench-breastmnist: install
	$(BIN)/python tests/bench_breastmnist.py --data $(BREASTMNIST) $(ARGS)

# One of five demo sites sends x1000-scaled updates: FedAvg with/without update validation vs Flower's robust strategies.
bench-robustness: install
	$(BIN)/python tests/bench_robustness.py $(ARGS)

# Treatment-effect analysis: federated figures next to lifelines on the pooled rows (demo and GBSG2), wall time.
bench-analysis: install
	$(BIN)/python tests/bench_analysis.py $(ARGS)

# Differential privacy: epsilon in {inf, 8, 3, 1} against AUC (oncology response, radiology demo), same seeds.
bench-privacy: install
	$(BIN)/python tests/bench_privacy.py $(ARGS)

# Secure aggregation (SecAgg+) vs plain FedAvg, 5 demo sites: round wall time, bytes per site, model difference.
bench-secure: install
	$(BIN)/python tests/bench_secure.py $(ARGS)

# DICOM pixel decoding per transfer syntax and plugin (a radiograph-sized image and pydicom's samples): images/s, MB/s.
bench-decode: install
	$(BIN)/python tests/bench_decode.py $(ARGS)

# Retrieval from a PACS (Orthanc on 127.0.0.1, DICOMweb and DIMSE): instances/s cold and incremental.
bench-pacs: install system-deps
	$(BIN)/python tests/bench_pacs.py $(ARGS)

# The plainest Flower app of the same shape vs `flwr run .` vs `fedhosp run`: wall time and peak RSS.
bench-overhead: install
	$(BIN)/python tests/bench_overhead.py $(ARGS)

# Coordinator + one SuperNode per site on 127.0.0.1: TLS, node authentication, MLflow server on PostgreSQL.
deploy-local: install
	$(BIN)/fedhosp deploy-local --sites $(SITES) --rounds $(ROUNDS) --task $(TASK)

clean:
	rm -rf .fedhosp .pytest_cache

# Also the environment (outside the checkout) and its link.
distclean: clean
	rm -rf $(VENV_STORE) $(VENV)
