# Quick start targets (README). Each installs what is missing first (scripts/setup.sh).
.PHONY: demo test bench report compat peer fuzz
# The DSI train -> prune -> recover cycle on the embedded offline corpus with the default recipe (the
# defaults of RunConfig, TrainConfig and RecoverConfig, chosen by measurement with benches/dsi_recipe.py):
# BM25, the zero-shot dense row, a tiny T5 trained from random init, then 0.2 and 0.9 (CSR) and 2:4 recovered.
demo:
	scripts/setup.sh dsi && sparse-t5 dsi run --prune 0.2 0.9 2:4 --out runs/demo
test:
	scripts/test.sh
bench:
	scripts/setup.sh test && python3 -m pytest benches -p no:cacheprovider
# Measure the memory and speed suites and regenerate the README's Results and the plot.
report:
	scripts/setup.sh test && python3 benches/report.py
# Both ends of each supported range: the op tests against torch 2.13.0 and 2.15.0 (fresh virtual
# environments, plain `pip install -e .`), then the model, checkpoint and DSI-decoding tests and HF's
# own T5 suite against the oldest and newest tested transformers (README "Tested versions").
compat:
	scripts/check_torch_compat.sh
	scripts/setup.sh test && scripts/check_transformers_compat.sh
# HF's own T5 tests with our class swapped in, against the control, for every archive in
# ../shared/peer; fails on a difference that tests/peer/known_differences.json does not explain.
peer:
	scripts/setup.sh test && python3 scripts/peer_suite.py
# The long fuzz run of the six CPU ops (tests/test_ops_fuzz.py, several seeds), also against the
# ASan + UBSan build of the ops (README "Bad input").
fuzz:
	scripts/setup.sh test && scripts/fuzz_ops.sh
