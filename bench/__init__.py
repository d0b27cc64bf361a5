"""pgflow benchmark: ``python -m bench.run --help``; see bench/README.md."""
