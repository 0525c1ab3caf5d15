#!/bin/sh
# Installs llmctl for one backend into a fresh virtual environment. Every image's build stage runs this script,
# and the test suite runs it in a clean venv, so what CI checks is what the images contain.
#
#   install.sh BACKEND [SOURCE_DIR]      BACKEND: cpu | cuda | rocm | xpu; SOURCE_DIR: the repository (default .)
#
# Environment:
#   LLMCTL_VENV          where to create the venv (default /opt/llmctl)
#   LLMCTL_PYTHON        the interpreter that creates it (default python3)
#   LLMCTL_TORCH_SPEC    the torch requirement (default torch==2.13.0, as the Makefile)
#   LLMCTL_TORCH_INDEX   the index torch comes from (default: PyTorch's index for BACKEND; empty: pip's own)
#   LLMCTL_PIP_FLAGS     extra pip flags (the images pass --no-cache-dir)
set -eu

backend=${1:?usage: install.sh cpu|cuda|rocm|xpu [SOURCE_DIR]}
src=${2:-.}
venv=${LLMCTL_VENV:-/opt/llmctl}
torch_spec=${LLMCTL_TORCH_SPEC:-torch==2.13.0}
pip_flags=${LLMCTL_PIP_FLAGS:-}

case "$backend" in
  cpu)  default_index=https://download.pytorch.org/whl/cpu;    plugins="$src/plugin_cpu" ;;
  cuda) default_index=https://download.pytorch.org/whl/cu128;  plugins="$src/gpu $src/triton_kernels $src/plugin_cuda" ;;
  rocm) default_index=https://download.pytorch.org/whl/rocm6.4; plugins="$src/gpu $src/triton_kernels $src/plugin_rocm" ;;
  xpu)  default_index=https://download.pytorch.org/whl/xpu;    plugins="$src/plugin_xpu" ;;
  *) echo "install.sh: BACKEND must be cpu, cuda, rocm or xpu, got '$backend'" >&2; exit 2 ;;
esac
index=${LLMCTL_TORCH_INDEX-$default_index}
for dir in "$src/core" "$src/server" "$src/cli" $plugins; do
  [ -f "$dir/pyproject.toml" ] || { echo "install.sh: $dir is not a package folder (SOURCE_DIR=$src)" >&2; exit 2; }
done

"${LLMCTL_PYTHON:-python3}" -m venv "$venv"
pip="$venv/bin/pip"
# shellcheck disable=SC2086  # pip_flags and plugins are word lists
"$pip" install $pip_flags --quiet --upgrade pip
# torch first, from the backend's index: the packages below only ask for torch>=2.4 and keep this one.
# shellcheck disable=SC2086
"$pip" install $pip_flags --quiet ${index:+--index-url "$index"} "$torch_spec"
# Regular (non-editable) installs: the venv must not depend on the source folder afterwards.
# shellcheck disable=SC2086
"$pip" install $pip_flags --quiet "$src/core" $plugins "$src/server[tracing]" "$src/cli"

# Fail the build here rather than at the first request: the CLI runs and the backend's plugin is registered.
"$venv/bin/llmctl" --help >/dev/null
"$venv/bin/python" - "$backend" <<'PY'
import sys
from importlib.metadata import entry_points

backend = sys.argv[1]
names = {ep.name for ep in entry_points(group="llmctl.plugins")}
if backend not in names:
    sys.exit(f"install.sh: the {backend} plugin is not registered (found: {sorted(names)})")
import llmctl_server.web_ui as web

if not (web.STATIC_DIR / "index.html").is_file():
    sys.exit("install.sh: the web console's static files are missing from the server package")
print(f"llmctl installed for {backend}: plugins {sorted(names)}")
PY
