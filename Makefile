# Two commands on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC picks the torch build; the default is the CPU wheel this project is tested with.
# On a GPU machine: make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: demo test test-all venv clean-demo

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/mbir-batch simulate --phantom 9001 --size 64 --task svct --views 8 --out $(DEMO_DIR)/svct8.zarr --overwrite
	$(BIN)/mbir-batch submit $(DEMO_DIR)/svct8.zarr --method fbp --out $(DEMO_DIR)/svct8.fbp.zarr --overwrite
	$(BIN)/mbir-batch submit $(DEMO_DIR)/svct8.zarr --method admm-tv --out $(DEMO_DIR)/svct8.admm-tv.zarr --overwrite
	$(BIN)/mbir-batch submit $(DEMO_DIR)/svct8.zarr --method dds --out $(DEMO_DIR)/svct8.dds.zarr --overwrite
	$(BIN)/mbir-batch report $(DEMO_DIR)/svct8.fbp.zarr $(DEMO_DIR)/svct8.admm-tv.zarr $(DEMO_DIR)/svct8.dds.zarr --png $(DEMO_DIR)/report.png

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m ''

clean-demo:
	rm -rf $(DEMO_DIR)
