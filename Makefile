# Quick start targets (README). Each installs what is missing first.
.PHONY: demo test bench
demo:
	scripts/setup.sh && python3 examples/quickstart.py
test:
	scripts/test.sh
bench:
	scripts/setup.sh test && python3 -m pytest benches -p no:cacheprovider
