"""The frozen-model-over-shards writer (ostinato.encoding): one loop for tokens and arrays, resumable, with workers
and several devices giving what one device in-process gives."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ostinato.data.arrays import ArrayManifest, StreamInfo, decode_array
from ostinato.data.sources import iter_raw_samples
from ostinato.encoding.arrays import encode_shards
from tests.synth import write_shards


class Frames(nn.Module):
    """A model that writes arrays: mean-pooled frames (``[B, 1, T]`` -> latents ``[B, 2, T / 100]``) and their
    sign as codes (``[B, 1, T / 200]``); deterministic, so any device split must give the same arrays."""

    array_kind = "frames"
    sample_rate, channels = 8000, 1

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, -2.0]))

    def array_streams(self) -> dict[str, StreamInfo]:
        return {"latents": StreamInfo(80.0, 2, "float16"), "codes": StreamInfo(40.0, 1, "int16", 2)}

    def encode_arrays(self, wav: Tensor) -> dict[str, Tensor]:
        latents = nn.functional.avg_pool1d(wav, 100) * self.scale[None, :, None]
        codes = (nn.functional.avg_pool1d(wav, 200) > 0).long()
        return {"latents": latents, "codes": codes}


def _arrays(folder: Path) -> dict[str, dict[str, Tensor]]:
    out = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        for s in iter_raw_samples(str(shard)):
            out[s["__key__"]] = {n: decode_array(s[f"{n}.npy"]) for n in ("latents", "codes")}
    return out


def test_devices_and_workers_write_what_one_device_writes(tmp_path: Path):
    write_shards(tmp_path / "s", n_shards=3, per_shard=4, sample_rate=8000, seconds=[0.2, 0.3, 0.2, 0.5] * 3)
    model = Frames().eval()
    one = encode_shards(model, tmp_path / "s", tmp_path / "one", progress=False)
    two = encode_shards(model, tmp_path / "s", tmp_path / "two", workers=1, devices=["cpu", "cpu"],
                        progress=False)
    assert one.total_samples == two.total_samples == 12 and one.source["skipped"] == two.source["skipped"] == 0
    assert [s.frames for s in one.shards] == [s.frames for s in two.shards] == [96, 96, 96]
    a, b = _arrays(tmp_path / "one"), _arrays(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 12
    for key in a:
        assert a[key]["latents"].shape[0] == 2 and a[key]["codes"].dtype == torch.int64
        assert all(torch.equal(a[key][n], b[key][n]) for n in ("latents", "codes"))
    assert ArrayManifest.load(tmp_path / "two").streams["codes"].card == 2


def test_a_rerun_resumes_and_skips_finished_shards(tmp_path: Path):
    write_shards(tmp_path / "s", n_shards=2, per_shard=3, sample_rate=8000, seconds=0.2)
    model = Frames().eval()
    encode_shards(model, tmp_path / "s", tmp_path / "a", progress=False)
    first = (tmp_path / "a" / "shard-000000.tar").stat().st_mtime_ns
    for name in ("shard-000001.json", "manifest.json"):  # as if the run had died before the second shard's marker
        (tmp_path / "a" / name).unlink()
    m = encode_shards(model, tmp_path / "s", tmp_path / "a", progress=False)
    assert (tmp_path / "a" / "shard-000000.tar").stat().st_mtime_ns == first and m.total_samples == 6
