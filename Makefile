# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast zoo clean-runs

venv: $(STAMP)

# The stamp depends on the dependency files, so editing them reinstalls.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchvision, timm, deepspeed; print('env ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)"
	touch $(STAMP)

# The main job: default MIM pretraining of the small model on the embedded dataset.
demo: venv
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero2.json

test: venv
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q tests

zoo: venv
	$(PY) -m beit_scale.models

clean-runs:
	rm -rf runs/
