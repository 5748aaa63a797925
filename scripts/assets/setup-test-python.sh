#!/usr/bin/env bash
# Creates the Python environment some tests use as an independent reference: the official
# `huggingface_hub` client (it builds a real Hugging Face cache that `fetch` must read), and
# DuckDB and pyarrow, which must read the Parquet outputs; PyYAML (a dependency of
# huggingface_hub) checks the Kubernetes templates (scripts/k8s/check.py).
# Idempotent. Location: $SOURCE_TDA_PYTHON_ENV, default .cache/py in the repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
env_dir="${SOURCE_TDA_PYTHON_ENV:-.cache/py}"
if [ ! -x "$env_dir/bin/python" ]; then
  python3 -m venv "$env_dir"
fi
if ! "$env_dir/bin/python" -c "import huggingface_hub, duckdb, pyarrow, yaml" 2>/dev/null; then
  "$env_dir/bin/pip" install --quiet --disable-pip-version-check 'huggingface_hub==2.4.0' 'duckdb==2.0.1' 'pyarrow==26.0.1'
fi
"$env_dir/bin/python" -c "import huggingface_hub as h; print('huggingface_hub', h.__version__, 'in', '$env_dir')"
