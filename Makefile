# Quick start targets (README). Each installs what is missing first (scripts/setup.sh).
.PHONY: demo test bench report
# The DSI train -> prune -> recover cycle on the embedded offline corpus (CPU, about 15 minutes).
demo:
	scripts/setup.sh dsi && sparse-t5 dsi run --prune 0.2 0.9 2:4 --out runs/demo
test:
	scripts/test.sh
bench:
	scripts/setup.sh test && python3 -m pytest benches -p no:cacheprovider
# Measure the memory and speed suites and regenerate the README's Results and the plot.
report:
	scripts/setup.sh test && python3 benches/report.py
