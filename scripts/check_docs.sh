#!/usr/bin/env bash
# The documentation's checks alone, for after an edit of README.md or docs/: the README's length,
# every relative link, every shown `tfcovid ...` command parsed by the real CLI, the cheap ones
# run for real, and the TFLite/ONNX pixel recipe of docs/inference.md (about 2 minutes on 2 cores).
# CI runs the same tests as part of the suite (.ci/run's pytest step).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -n 0 tests/test_docs.py \
  "tests/test_export.py::test_the_readme_pixel_recipe_reproduces_predict" "$@"
