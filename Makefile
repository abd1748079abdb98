# Quick start targets (README). Each installs what is missing first (scripts/setup.sh).
.PHONY: demo test bench report compat
# The DSI train -> prune -> recover cycle on the embedded offline corpus, with the study's settings
# (AdamW betas 0.9/0.98, lr 1e-3, batch 8, global magnitude pruning, 15 recovery epochs); a small
# T5 (d_model 64) from random init gets 80 training epochs so the demo fits ~15 minutes on 2 cores.
demo:
	scripts/setup.sh dsi && sparse-t5 dsi run --prune 0.2 0.9 2:4 --model-size tiny --epochs 80 --recover-epochs 15 --out runs/demo
test:
	scripts/test.sh
bench:
	scripts/setup.sh test && python3 -m pytest benches -p no:cacheprovider
# Measure the memory and speed suites and regenerate the README's Results and the plot.
report:
	scripts/setup.sh test && python3 benches/report.py
# Build and run the op tests in fresh virtual environments against both ends of the supported torch
# range (2.13.0 and 2.15.0), each with a plain `pip install -e .` (README "Install").
compat:
	scripts/check_torch_compat.sh
