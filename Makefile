# fundus-edge: two commands, `make demo` and `make test`. Each creates .venv on first use.
# pip resolves torch/torchvision through this machine's pip config (local store, version cap).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fundus-edge-installed
DEMO ?= demo
PYTEST_ARGS ?=

.PHONY: demo test lint format venv clean-demo help

help:
	@echo "make demo   - run the whole job end to end on generated data (creates .venv)"
	@echo "make test   - ruff lint + format check and the whole pytest suite (creates .venv)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[train,dev,openvino,dicom,report,serve,tensorboard,mlflow]'
	@touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The demo: each step is a real command a user would type. Outputs go to $(DEMO)/ (git-ignored).
FE := $(BIN)/fundus-edge
DEMO_N ?= 1500
DEMO_SIZE ?= 192

demo: $(STAMP)
	@mkdir -p $(DEMO)
	$(FE) synth $(DEMO)/data --n $(DEMO_N) --size $(DEMO_SIZE) --seed 0 --workers 2 --overwrite
	$(FE) doctor --no-camera-probe
	$(FE) dataset $(DEMO)/data --json $(DEMO)/dataset.json
	$(FE) train --config training/demo-cpu.yaml --data $(DEMO)/data --out $(DEMO)/run --overwrite
	$(FE) eval --model $(DEMO)/run/best.safetensors --data $(DEMO)/data --split test \
		--json $(DEMO)/eval/test.json --out $(DEMO)/eval
	# The workstation: checkpoint -> FP32 ONNX (PyTorch parity, grad-cam check).
	$(FE) export --model $(DEMO)/run/best.safetensors --out $(DEMO)/export --format onnx
	# The device: the same chain from that ONNX (no PyTorch needed) -> INT8 Q/DQ.
	$(FE) export --model $(DEMO)/export/model.onnx --out $(DEMO)/export --format onnx \
		--int8 --calib $(DEMO)/data --calib-count 64
	$(BIN)/python -c "import cv2, skimage.data as d; cv2.imwrite('$(DEMO)/retina.png', d.retina()[:, :, ::-1])"
	$(FE) clip '$(DEMO)/data/Test_Set/Test/1?.png' $(DEMO)/retina.png --out $(DEMO)/clip.mp4 --fps 5 --hold 3
	$(FE) run $(DEMO)/export/model.int8.onnx $(DEMO)/clip.mp4 --headless \
		--save-video $(DEMO)/clip-annotated.mp4 --jsonl $(DEMO)/clip.jsonl --summary-json $(DEMO)/clip-summary.json
	$(FE) run $(DEMO)/export/model.onnx $(DEMO)/retina.png --headless --save-dir $(DEMO)/overlay \
		--jsonl $(DEMO)/retina.jsonl
	# A compact student distilled from the ensemble (one MobileNetV3, one pass): the same
	# contract (probabilities, per-label maps, attention), so eval, export and run take it as is.
	# Its extra images stand for a clinic's unlabelled archive (generated, another seed: the
	# distiller never reads their labels).
	$(FE) synth $(DEMO)/unlabelled --n 1000 --size $(DEMO_SIZE) --seed 1 --workers 2 --overwrite
	$(FE) distill --config training/distill-demo.yaml --teacher $(DEMO)/run/best.safetensors \
		--data $(DEMO)/data --unlabelled $(DEMO)/unlabelled --out $(DEMO)/student --overwrite
	$(FE) eval --model $(DEMO)/student/best.safetensors --data $(DEMO)/data --split test \
		--json $(DEMO)/student-eval/test.json --out $(DEMO)/student-eval
	$(FE) export --model $(DEMO)/student/best.safetensors --out $(DEMO)/student-export --format onnx
	$(FE) run $(DEMO)/student-export/model.onnx $(DEMO)/retina.png --headless \
		--save-dir $(DEMO)/student-overlay --jsonl $(DEMO)/student-retina.jsonl
	$(BIN)/python bench/run_suite.py --quick --out $(DEMO)/bench
	@echo "demo: outputs in $(DEMO)/ (eval/test.json, export/export_report.json, clip-annotated.mp4, student-eval/test.json, bench/report.md)"

clean-demo:
	rm -rf $(DEMO)
