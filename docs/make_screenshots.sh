#!/usr/bin/env bash
# Retake the README's dashboard screenshots: the browser test saves one PNG per page.
set -euo pipefail
cd "$(dirname "$0")/.."
TVM_UI_SCREENSHOTS=docs/screenshots .venv/bin/python -m pytest -q tests/ui/test_ui_browser.py
