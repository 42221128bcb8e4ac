# Sourced by scripts/*: create .venv and install the project with the given extras.
#
# torch is installed on its own first, pinned: a bare `torch` requirement lets
# pip pick the newest release, which on Linux means gigabytes of CUDA wheels
# even on a CPU-only host. VLMQ_TORCH_SPEC overrides the pin (e.g. a CUDA build
# on a GPU host).
ensure_venv() {
    local extras="$1"
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv with $($python --version)" >&2
        "$python" -m venv .venv
    fi
    local stamp=".venv/.vlmq-installed-${extras//,/-}"
    local want
    want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    if [[ ",$extras," == *",worker,"* ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
        echo "installing torch (${VLMQ_TORCH_SPEC:-torch==2.13.0})" >&2
        .venv/bin/python -m pip install -q "${VLMQ_TORCH_SPEC:-torch==2.13.0}"
    fi
    echo "installing vlmq[$extras] into .venv" >&2
    .venv/bin/python -m pip install -q -e ".[$extras]"
    echo "$want" > "$stamp"
}
