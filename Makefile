# Two commands do all set-up: `make demo` and `make test`. Both are quick when everything is installed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# reference packages the parity tests build their models with, each in its own folder (never on the venv's path)
REF    := $(VENV)/ref
AUDIOCRAFT_REF := audiocraft==1.3.0 einops==0.8.2 julius==0.2.8 num2words==0.5.14 flashy==0.0.2 av==18.1.0 \
                  colorlog==6.12.0 docopt==0.6.2
# descript-audio-codec 1.0.0 and what it imports: its descript-audiotools pins protobuf<3.20 (ours is 7)
DAC_REF := descript-audio-codec==1.0.0 descript-audiotools==0.7.2 argbind==0.3.9 docstring-parser==0.18.0 \
           einops==0.8.2 julius==0.2.8 flatten-dict==0.4.2 six==1.17.0 ffmpy==1.0.0 importlib-resources==7.1.0 \
           randomname==0.2.1
# kadtk 1.1.0 (Kernel Audio Distance) pins torch<2.6, numpy<2 and tensorflow: installed without them; the rest of
# what it imports at module level (librosa, soundfile, torchaudio, scipy) is in the venv
KADTK_REF := kadtk==1.1.0 hypy-utils==1.0.29
# chromium + chromium-driver: the headless browser of the app and demo-report tests
APT_PACKAGES := fluidsynth fluid-soundfont-gm chromium chromium-driver
DEMO_DIR ?= data/demo
# what the venv takes on disk, torch's CUDA wheels included (measured: 6.0 GB)
INSTALL_GB := 7
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install sysdeps demo test bench clean-demo

install: $(STAMP) sysdeps

$(STAMP): pyproject.toml constraints.txt Makefile  # a new reference package in REF installs on the next make
	@free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  [ "$$free_gb" -ge $(INSTALL_GB) ] || echo "warning: $$free_gb GB free in $(CURDIR); the install (torch with its CUDA libraries) takes about $(INSTALL_GB) GB" >&2
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'"
	@$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]' || { \
	  echo "pip install failed; if it says 'No space left on device': df -h $(CURDIR) shows what is free, and the venv needs about $(INSTALL_GB) GB" >&2; exit 1; }
# laion-clap pins numpy<2 (it runs on numpy 2): installed without its requirements, which are in pyproject.toml.
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt laion-clap==1.1.7
# audiocraft 1.3.0 pins torch 2.1: installed without its requirements into its own folder (tests/references.py)
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(REF)/audiocraft $(AUDIOCRAFT_REF)
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(REF)/dac $(DAC_REF)
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(REF)/kadtk $(KADTK_REF)
	@touch $@

sysdeps:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
	  echo "installing Debian packages: $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); }

demo: install
	OSTINATO_DATA=$(dir $(abspath $(DEMO_DIR))) $(BIN)/ostinato demo --data $(DEMO_DIR)

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2

bench: install
	$(BIN)/python bench/data_throughput.py --shards $(DEMO_DIR)/shards/train

clean-demo:
	rm -rf $(DEMO_DIR)
