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

export DATA_DIR
export DATASET
export PYTHONUNBUFFERED := 1
# the offline switches are set by every stage (pipeline.runtime.OFFLINE_ENV, their one home)

STAMP := $(VENV)/.installed

.PHONY: help install data folds train-det train-cls train-seg tune cv submit score demo baseline \
        kernel kernel-push bench bench-scale test test-all lint clean

help:
	@echo "make demo     - the whole pipeline on the synthetic set, ending with its score"
	@echo "make test     - the test suite (CPU, a few minutes)"
	@echo "make install | data | folds | train-det | train-cls | train-seg | tune | cv | submit | score"
	@echo "make baseline | kernel | kernel-push | bench | bench-scale | lint | clean"
	@echo "variables: DATASET (uwmgi|lgg|nerve) DATA_DIR CONFIG CONFIG_CLS CONFIG_DET ENSEMBLE FOLDS FOLDS_CONFIG JOBS GPUS SET SEED DEBUG"

install: $(STAMP)
$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

data: $(STAMP)
	$(PY) -m stages.make_data --dataset $(DATASET) --out $(DATA_DIR) --preset $(PRESET) --workers 2

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
	$(PY) -m stages.cv --config $(ENSEMBLE)

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
	$(MAKE) --no-print-directory tune cv submit; \
	$(MAKE) --no-print-directory baseline; \
	echo "== demo wall time: $$(( $$(date +%s) - t0 )) s (install excluded)"; \
	echo "== full pipeline ($(ENSEMBLE): fold ensemble + TTA + tuned post-processing, with crop, gate, 2.5D and a 3D member where its configs use them):"; \
	$(MAKE) --no-print-directory score

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

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs cache build submission.csv reports
