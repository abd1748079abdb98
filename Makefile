# Quick start targets (README). Each installs what is missing first (scripts/setup.sh).
.PHONY: demo test bench report
# The DSI train -> prune -> recover cycle on the embedded offline corpus, with the study's settings
# (AdamW betas 0.9/0.98, lr 1e-3, batch 8, global magnitude pruning) and its epochs (10 + 15) scaled
# to a 2-core CPU so that the whole demo takes about 15 minutes.
demo:
	scripts/setup.sh dsi && sparse-t5 dsi run --prune 0.2 0.9 2:4 --epochs 12 --recover-epochs 4 --out runs/demo
test:
	scripts/test.sh
bench:
	scripts/setup.sh test && python3 -m pytest benches -p no:cacheprovider
# Measure the memory and speed suites and regenerate the README's Results and the plot.
report:
	scripts/setup.sh test && python3 benches/report.py
