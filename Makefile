# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_run

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m refer.demo_data --out $(DEMO)/data --images 300 --size 64 --seed 0 --overwrite
	$(PY) -m bert.build_small --refer_data_root $(DEMO)/data --dataset rrsisd --out $(DEMO)/bert --overwrite
	@echo "demo: training the nano RMSIN from scratch on CPU (25 short epochs, about 4 minutes)"
	@# one thread: the nano model's tensors are too small for more threads to pay off on a busy CPU
	OMP_NUM_THREADS=1 $(PY) train.py --device cpu --dataset rrsisd --refer_data_root $(DEMO)/data \
		--bert_tokenizer $(DEMO)/bert --ck_bert $(DEMO)/bert --swin_type nano --img_size 64 \
		--pretrained_swin_weights '' --epochs 25 --batch-size 8 --lr 1e-3 --workers 0 \
		--output-dir $(DEMO)/checkpoints --model_id demo --print-freq 10 --overwrite
	OMP_NUM_THREADS=1 $(PY) test.py --device cpu --dataset rrsisd --refer_data_root $(DEMO)/data \
		--bert_tokenizer $(DEMO)/bert --ck_bert $(DEMO)/bert --swin_type nano --img_size 64 --workers 0 \
		--resume $(DEMO)/checkpoints/model_best_demo.pth --split test --vis_dir $(DEMO)/vis --vis_num 8 --overwrite
	@echo "demo: objects cover ~2% of the demo images, so marking everything as the object scores ~2 oIoU;"
	@echo "demo: metrics JSON next to $(DEMO)/checkpoints/model_best_demo.pth, overlays in $(DEMO)/vis/"

clean:
	rm -rf $(VENV) $(DEMO)
