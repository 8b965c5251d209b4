# Staged ensemble pipeline. Quick start: `make demo` (the whole job) and `make test`.
# DATASET=uwmgi|lgg|nerve picks the dataset plug-in (pipeline/datasets/), its configs and its data folder.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BASE ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
DATASET     ?= uwmgi
DATA_DIR    ?= data/$(DATASET)
# configs of a dataset other than UW-Madison carry its name: configs/lgg_demo_seg.yaml
P           := $(if $(filter uwmgi,$(DATASET)),,$(DATASET)_)
PRESET      ?= demo
CONFIG_DET  ?= configs/$(P)demo_det.yaml
CONFIG_CLS  ?= configs/$(P)demo_cls.yaml
CONFIG      ?= configs/$(P)demo_seg.yaml
BASELINE    ?= configs/$(P)demo_seg_baseline.yaml
ENSEMBLE    ?= configs/$(P)demo_ensemble.yaml
BASELINE_ENSEMBLE ?= configs/$(P)demo_baseline_ensemble.yaml
SUBMISSION  ?= $(if $(P),build/$(P)submission.csv,submission.csv)
# datasets whose demo crops to the detector's box (the nerve frames are used whole)
DEMO_DET_uwmgi := train-det
DEMO_DET_lgg   := train-det
DEMO_DET_nerve :=
# datasets whose demo ensemble blends a 3D member with the 2.5D one (volumes): its config
DEMO_3D_uwmgi := configs/demo_seg3d.yaml
DEMO_3D_lgg   :=
DEMO_3D_nerve :=
FOLDS       ?=
FOLDS_CONFIG ?= configs/folds.yaml
JOBS        ?= auto
# GPUS=n (n > 1): train-cls / train-seg run under torchrun (`python -m torch.distributed.run` is its
# module, found by any PY with torch), each fold on n GPUs with DDP, rank 0 writing the files
GPUS        ?= 1
TRAIN_RUN   := $(PY)$(if $(filter-out 0 1,$(GPUS)), -m torch.distributed.run --standalone --nproc_per_node=$(GPUS))
FORCE       ?=
KAGGLE_USER ?=
SET         ?=
# SEED=n: train.seed / det.seed of every trained stage (the demo's spread over seeds); use its own RUNS_DIR
SEED        ?=
DET_SET     := $(strip $(SET) $(if $(SEED),det.seed=$(SEED)))
TRAIN_SET   := $(strip $(SET) $(if $(SEED),train.seed=$(SEED)))
# CPU_ISA=avx2|avx512: every stage pins torch's CPU kernels (ATen, oneDNN, MKL), numba and OpenBLAS to
# that instruction set, so machines with different CPUs compute alike (docs/REPRODUCIBILITY.md)
export CPU_ISA ?=

export DATA_DIR
export DATASET
export PYTHONUNBUFFERED := 1
# the offline switches are set by every stage (pipeline.runtime.OFFLINE_ENV, their one home)

STAMP := $(VENV)/.installed

.PHONY: help install data folds train-det train-cls train-seg tune cv submit score demo baseline \
        kernel kernel-push bench bench-scale test test-all lint clean weights download bench-gpu report status data-stats

help:
	@echo "make demo     - the whole pipeline on the synthetic set, ending with its score"
	@echo "make test     - the test suite (CPU, a few minutes)"
	@echo "make install | data | folds | train-det | train-cls | train-seg | tune | cv | submit | score"
	@echo "make baseline | kernel | kernel-push | bench | bench-scale | lint | clean"
	@echo "make status   - what is trained, what is stale, and the next command; make report - the HTML run report"
	@echo "make weights | download | bench-gpu  (pretrained weights / the real data: once, with internet; GPU figures)"
	@echo "make data-stats - the real-vs-phantom statistics of DATA_DIR (COMPARE=DIR: a second column)"
	@echo "variables: DATASET (uwmgi|lgg|nerve) DATA_DIR CONFIG CONFIG_CLS CONFIG_DET ENSEMBLE FOLDS FOLDS_CONFIG JOBS GPUS SET SEED DEBUG"
	@echo "           RUNS_DIR CACHE_DIR WEIGHTS_DIR CPU_ISA FORCE KAGGLE_USER COMPARE"

install: $(STAMP)
$(STAMP): requirements.txt requirements-dev.txt requirements-tracker.txt
	$(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -r requirements-tracker.txt
	touch $@

data: $(STAMP)
	$(PY) -m stages.make_data --dataset $(DATASET) --out $(DATA_DIR) --preset $(PRESET) --workers 2

# the numbers of DATA_DIR, real or phantom (tumour / nerve size, place, contrast); COMPARE=DIR prints its column beside
data-stats: $(STAMP)
	$(PY) -m stages.data_stats --dataset $(DATASET) --data-dir $(DATA_DIR) $(if $(COMPARE),--compare $(COMPARE))

# The real data through the official kaggle CLI (credentials: ~/.kaggle/kaggle.json or KAGGLE_USERNAME and
# KAGGLE_KEY) into DATA_DIR, unpacked safely and checked by the dataset's scanner; a complete folder is kept.
download: $(STAMP)
	$(PY) -m stages.download --dataset $(DATASET) --out $(DATA_DIR) $(if $(FORCE),--force)

# The one step that downloads pretrained weights (smp / timm ImageNet encoders, ultralytics' COCO YOLO), on
# a machine with internet, into WEIGHTS_DIR with a manifest; training reads only that. CONFIG, CONFIG_CLS,
# CONFIG_DET or ENSEMBLE given on the command line pick the configs; with none, every full config of DATASET.
WEIGHTS_DIR ?= $(CURDIR)/weights
export WEIGHTS_DIR
WEIGHTS_FOR = $(strip $(foreach v,CONFIG CONFIG_CLS CONFIG_DET ENSEMBLE,$(if $(filter command line environment,$(origin $(v))),$($(v)))))
weights: $(STAMP)
	$(PY) -m stages.weights $(or $(WEIGHTS_FOR),$(wildcard configs/$(P)full_*.yaml)) $(if $(FORCE),--force)

folds: $(STAMP)
	$(PY) -m stages.folds --config $(FOLDS_CONFIG) --set dataset=$(DATASET) $(if $(FORCE),--force)

train-det: $(STAMP)
	$(PY) -m stages.train_det --config $(CONFIG_DET) $(if $(DET_SET),--set $(DET_SET))

train-cls: $(STAMP)
	$(TRAIN_RUN) -m stages.train_cls --config $(CONFIG_CLS) $(if $(FOLDS),--folds $(FOLDS)) --jobs $(JOBS) $(if $(TRAIN_SET),--set $(TRAIN_SET))

train-seg: $(STAMP)
	$(TRAIN_RUN) -m stages.train_seg --config $(CONFIG) $(if $(FOLDS),--folds $(FOLDS)) --jobs $(JOBS) $(if $(TRAIN_SET),--set $(TRAIN_SET))

tune: $(STAMP)
	$(PY) -m stages.tune --config $(ENSEMBLE)

cv: $(STAMP)
	$(PY) -m stages.cv --config $(ENSEMBLE) --submission $(SUBMISSION)

# one self-contained HTML page of the ensemble (also written at the end of make cv and make demo)
REPORT_PAGE = $(or $(RUNS_DIR),runs)/ensemble/$(basename $(notdir $(ENSEMBLE)))/report/index.html
report: $(STAMP)
	$(PY) -m stages.report --config $(ENSEMBLE) --submission $(SUBMISSION)

# the pipeline's state for DATASET / DATA_DIR / RUNS_DIR and ENSEMBLE, and the next command to run
status: $(STAMP)
	@$(PY) -m stages.status --config $(ENSEMBLE) --submission $(SUBMISSION)

submit: $(STAMP)
	$(PY) -m stages.submit --config $(ENSEMBLE) --out $(SUBMISSION)

score: $(STAMP)
	$(PY) -m stages.score --dataset $(DATASET) --submission $(SUBMISSION) --truth $(DATA_DIR)/test_labels.csv --data-dir $(DATA_DIR)

# The comparison point: one plain 2D segmenter (fold 0 of demo_seg_baseline: 1 channel, no crop),
# no classifier gate, no TTA, threshold 0.5; trained, submitted and scored like the full pipeline.
baseline: $(STAMP)
	@set -e; \
	$(MAKE) --no-print-directory train-seg CONFIG=$(BASELINE) FOLDS=0; \
	$(MAKE) --no-print-directory tune submit ENSEMBLE=$(BASELINE_ENSEMBLE) SUBMISSION=build/$(P)baseline_submission.csv; \
	echo "== baseline (single 2D segmenter, no crop, gate or TTA):"; \
	$(MAKE) --no-print-directory score SUBMISSION=build/$(P)baseline_submission.csv | tail -n 1

# The main job: every stage on the embedded synthetic set (4 folds, trained two at a time on a
# 2-core CPU), then the single-2D baseline for comparison, ending with the score of submission.csv.
demo: $(STAMP)
	@set -e; t0=$$(date +%s); \
	$(MAKE) --no-print-directory data folds $(DEMO_DET_$(DATASET)) train-cls train-seg FOLDS_CONFIG=configs/demo_folds.yaml; \
	$(if $(DEMO_3D_$(DATASET)),$(MAKE) --no-print-directory train-seg CONFIG=$(DEMO_3D_$(DATASET));) \
	$(MAKE) --no-print-directory tune; \
	if [ -f "$(DATA_DIR)/test_labels.csv" ]; then \
	$(MAKE) --no-print-directory cv submit; \
	$(MAKE) --no-print-directory baseline; \
	echo "== demo wall time: $$(( $$(date +%s) - t0 )) s (install excluded)"; \
	echo "== full pipeline ($(ENSEMBLE): fold ensemble + TTA + tuned post-processing, with crop, gate, 2.5D and a 3D member where its configs use them):"; \
	$(MAKE) --no-print-directory score; \
	$(MAKE) --no-print-directory report; \
	else \
	if [ -n "$$(ls -A "$(DATA_DIR)/test" 2>/dev/null)" ]; then $(MAKE) --no-print-directory submit; fi; \
	echo "== demo wall time: $$(( $$(date +%s) - t0 )) s (install excluded)"; \
	echo "== no test labels in $(DATA_DIR) (real data): the out-of-fold score of $(ENSEMBLE) instead (make cv):"; \
	$(MAKE) --no-print-directory cv; \
	fi; \
	echo "== report: $(REPORT_PAGE)"

kernel: $(STAMP)
	$(PY) -m stages.kernel build --config $(ENSEMBLE) $(if $(KAGGLE_USER),--user $(KAGGLE_USER))

kernel-push: kernel
	$(PY) -m stages.kernel push $(if $(KAGGLE_USER),--user $(KAGGLE_USER))

bench: $(STAMP)
	$(PY) -m stages.bench_rle
	$(PY) -m stages.bench_metric
	$(PY) -m stages.bench_infer
	$(PY) -m stages.bench_folds

# every stage after training (folds, cache, planted OOF, tune, cv, submit, score) at fractions of the
# `full` synthetic set, each in its own process: seconds, peak RSS, growth exponents, disk use
SCALES      ?= 0.125 0.25 0.5 1
bench-scale: $(STAMP)
	$(PY) -m stages.bench_scale --scales $(SCALES)

# GPU figures (H100/H200 class): CUDA RLE, AMP training images/s per full config, submit slices/s with and
# without TTA, 3D sliding-window volumes/s, DDP with 1 process against plain; a tiny CPU mode without CUDA
bench-gpu: $(STAMP)
	$(PY) -m stages.bench_gpu $(if $(BENCH_OUT),--out $(BENCH_OUT))

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy pipeline stages

clean:
	rm -rf runs cache build submission.csv reports
