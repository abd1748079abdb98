# Quick start targets (README). Each installs what is missing first (scripts/setup.sh).
.PHONY: demo test bench report compat
# The DSI train -> prune -> recover cycle on the embedded offline corpus with the default recipe
# (sparse_t5/dsi/pipeline.py RECIPE, chosen by measurement with benches/dsi_recipe.py): BM25, the
# zero-shot dense row, a tiny T5 trained from random init, then 0.2 and 0.9 (CSR) and 2:4 recovered.
demo:
	scripts/setup.sh dsi && sparse-t5 dsi run --prune 0.2 0.9 2:4 --out runs/demo
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
