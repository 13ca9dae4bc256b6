"""The full-size recipes (conf/experiment/recipe_*.yaml): each composes, validates, builds at its real size and
names its source.

Every recipe file states, in comments:
    # source: <where its numbers come from>          (the first comment after hydra's "# @package _global_")
    # params: 1.5e9                                    (trainable parameters of the family it builds)
    # gpus: N, per-GPU batch: B                        (what its data.batch_size assumes)
The family is built on the meta device (no memory, no weights), so a 3B model costs nothing; its parameter count
must be within 10 % of the stated one, so a recipe of the wrong size fails here. The stated GPUs times the per-GPU
batch must be the recipe's (global) ``data.batch_size``, which must divide over those GPUs (``check_global_batch``).

Files a recipe names but that are not on this machine are replaced for the test only (``_overrides``): the text
encoder (a T5-base ``save_pretrained`` folder in the recipes) becomes the packaged all-MiniLM-L6-v2. Its weights are
frozen and unregistered (not counted); only the projection onto the LM's width changes (384 instead of 768 inputs:
< 0.1 % of any recipe here). A style encoder's MERT folder becomes ``features: codec`` with the recipe's own
``feature_dim`` (the frozen features are not counted; the trained input projection keeps its size).
Data manifests are absent: the ``${manifest:KEY,FALLBACK}`` fallbacks stand.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.glob("conf/experiment/recipe_*.yaml"))
TOLERANCE = 0.10


def _overrides(cfg_family) -> list[str]:
    """Test-only stand-ins for files this machine lacks (see the module docstring)."""
    out = []
    text = cfg_family.get("text") if "text" in cfg_family else None
    if text is not None and text.get("model") not in (None, "scratch"):  # scratch: a tower trained here, no file
        out.append("family.text.model=null")  # the packaged all-MiniLM-L6-v2
    style = cfg_family.get("style") if "style" in cfg_family else None
    if style is not None and style.get("features", "codec") != "codec":
        out.append("family.style.features=codec")  # a MERT folder's frozen features -> the codec's, same feature_dim
    return out


def _stated(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        m = re.match(rf"#\s*{key}:\s*(.+)", line.strip())
        if m:
            return m.group(1).strip()
    raise AssertionError(f"{path.name}: no '# {key}: ...' comment")


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from ostinato.train import conf_dir

    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides])


def _on_cpu(load):
    """What cannot run on meta runs on the CPU: a text encoder's from_pretrained (frozen, not counted) and the mel
    filterbanks of the codec's losses (buffers, checked with .item())."""
    def wrapped(*args, **kwargs):
        with torch.device("cpu"):
            return load(*args, **kwargs)
    return wrapped


def test_there_are_recipes():
    assert RECIPES, "no conf/experiment/recipe_*.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_the_recipe_builds_at_its_stated_size(path, monkeypatch, tmp_path):
    import torchaudio
    from hydra.utils import instantiate

    import ostinato.nn.conditioners as conditioners
    from ostinato.engine.config import check_global_batch, validate

    # hydra reads "# @package" only from the leading "# @..." lines, so it comes first; the source right after it
    lines = [line for line in path.read_text().splitlines() if not re.match(r"\s*#\s*@", line)]
    assert re.match(r"#\s*source:\s*\S", lines[0]), f"{path.name}: the first comment must be '# source: ...'"
    stated = float(_stated(path, "params").split()[0])
    gpus = _stated(path, "gpus")
    assert re.search(r"\d", gpus) and "batch" in gpus, f"{path.name}: '# gpus: N, per-GPU batch: B'"

    monkeypatch.setenv("OSTINATO_DATA", str(tmp_path))  # no manifests there: the recipe's own dimensions stand
    cfg = _compose(path.stem, [])
    cfg = _compose(path.stem, _overrides(cfg.family))
    validate(cfg, data_paths=False)
    # the stated GPUs and per-GPU batch are the recipe's global data.batch_size, and it divides over them
    n_gpus, per_gpu = int(re.match(r"\d+", gpus)[0]), int(re.search(r"per-GPU batch:\s*(\d+)", gpus)[1])
    assert cfg.data.batch_size == n_gpus * per_gpu, f"{path.name}: data.batch_size vs '# gpus: {gpus}'"
    check_global_batch(cfg, n_gpus)

    monkeypatch.setattr(conditioners, "load_text_encoder", _on_cpu(conditioners.load_text_encoder))
    monkeypatch.setattr(torchaudio.functional, "melscale_fbanks", _on_cpu(torchaudio.functional.melscale_fbanks))
    with torch.device("meta"):
        family = instantiate(cfg.family, _convert_="all")
    count = sum(p.numel() for p in family.parameters())
    assert abs(count - stated) <= TOLERANCE * stated, f"{path.name}: {count:.4g} parameters, states {stated:.4g}"
