"""The demo's evaluation: ``evaluation/demo.yaml`` on the demo MusicGen, called by ``ostinato demo``."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ostinato.evaluation.suite import suites_dir

__all__ = ["run_demo_eval"]


def run_demo_eval(data: Path, outputs: Path, model_ref: str, codec_ref: str, *, overrides: Sequence[str] = (),
                  progress: bool = True) -> Path:
    """Run the demo suite on ``model_ref`` (decoded by ``codec_ref``, whose latents are also the FAD embedding),
    with ``data/shards/test`` as reference; results in ``outputs/demo/eval/``, reference statistics cached in
    ``outputs/eval_cache``. ``overrides``: more ``key=value`` suite overrides. Returns the path of ``report.md``."""
    from ostinato.evaluation.runner import run_suite

    overrides = [f"reference={Path(data) / 'shards' / 'test'}", f"embedding=codec:{codec_ref}", *overrides]
    result = run_suite(suites_dir() / "demo.yaml", model_ref, Path(outputs) / "demo" / "eval", codec=codec_ref,
                       overrides=overrides, progress=progress, cache=Path(outputs) / "eval_cache")
    return Path(result["report"])
