# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
#
# Another dependency set goes into its own venv, e.g. V100 (sm_70) clusters:
#   make test VENV=.venv-v100 REQUIREMENTS=requirements-v100.txt
#   make check-wheel VENV=.venv-v100 ARCH=sm_70
# Giving only one of the two is enough: REQUIREMENTS=requirements-X.txt alone uses VENV=.venv-X,
# and VENV=.venv-X alone uses requirements-X.txt when that file exists (so a second venv is never
# silently reinstalled from requirements.txt). Defaults: VENV=.venv, REQUIREMENTS=requirements.txt.
ifeq ($(origin VENV),undefined)
REQUIREMENTS ?= requirements.txt
VENV := $(if $(filter requirements.txt,$(REQUIREMENTS)),.venv,.venv-$(basename $(patsubst requirements-%,%,$(notdir $(REQUIREMENTS)))))
else
REQUIREMENTS ?= $(or $(wildcard requirements-$(patsubst .venv-%,%,$(notdir $(VENV))).txt),requirements.txt)
endif
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# One stamp per requirements file, so switching a venv to another file reinstalls it.
STAMP  := $(VENV)/.installed$(if $(filter requirements.txt,$(REQUIREMENTS)),,-$(basename $(notdir $(REQUIREMENTS))))
# CUDA arch(s) that `make check-wheel` requires in the installed torch wheel (empty: only print).
ARCH   ?= $(if $(filter requirements-v100.txt,$(notdir $(REQUIREMENTS))),sm_70,)

.PHONY: venv demo test test-fast zoo clean-runs check-wheel

venv: $(STAMP)

# The stamp depends on the dependency files, so editing them reinstalls.
$(STAMP): $(REQUIREMENTS) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r $(REQUIREMENTS)
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchvision, timm, deepspeed; print('env ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)"
	touch $(STAMP)

# Test-only packages (requirements-test.txt: transformers, dall-e for the interop tests) go into
# the same venv after the runtime set, for every REQUIREMENTS (the V100 venv too); their own stamp
# keeps `make demo` from installing them, and editing either file reinstalls.
TEST_STAMP := $(STAMP)-test
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PIP) install -r requirements-test.txt
	$(PY) -c "import transformers, dall_e; print('test env ok: transformers', transformers.__version__)"
	touch $(TEST_STAMP)

# The main job: default MIM pretraining of the small model on the embedded dataset.
demo: venv
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero2.json

test: $(TEST_STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q --durations=25 tests

zoo: venv
	$(PY) -m beit_scale.models

clean-runs:
	rm -rf runs/

# Print the installed torch wheel's version, CUDA version and compiled arch list (readable without a
# GPU); fail when an arch in ARCH is missing. Does not install anything: build the venv first.
check-wheel:
	@test -x $(PY) || { echo "check-wheel: $(PY) not found; build it first: make venv VENV=$(VENV) REQUIREMENTS=$(REQUIREMENTS)" >&2; exit 2; }
	@CHECK_ARCH="$(ARCH)" $(PY) -c 'import os, sys, torch, torchvision; \
	archs = getattr(torch._C, "_cuda_getArchFlags", lambda: "")().split() if torch.version.cuda else []; \
	print("torch", torch.__version__, "| torchvision", torchvision.__version__, "| CUDA", torch.version.cuda, "| arch list:", " ".join(archs) or "(none: not a CUDA build)"); \
	want = os.environ["CHECK_ARCH"].split(); missing = [a for a in want if a not in archs]; \
	print("required:", " ".join(want) or "(none)", "->", ("MISSING " + " ".join(missing)) if missing else "ok"); \
	sys.exit(1 if missing else 0)'
