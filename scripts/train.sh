#!/usr/bin/env bash
# The main job: MLIP pre-training on the built-in synthetic chest X-ray benchmark with DeepSpeed.
# Sets itself up on a fresh machine. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$PWD/.venv/bin:$PATH"
exec deepspeed train.py --deepspeed_config ds.json "$@"
