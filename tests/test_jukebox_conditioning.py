"""The Jukebox priors use their conditions: a top prior learns what its metadata says and samples by it (different
prompts, different codes; different seeds, different codes), an upsampler predicts from the upper level's codes
(CE with the true upper codes far below CE with another item's) and generates what they say."""
from __future__ import annotations

import math
import random

import pytest
import torch

from ostinato.data.arrays import ArrayBatch
from ostinato.evaluation.jukebox_checks import jukebox_diversity, prior_condition_ce
from ostinato.families.jukebox import JukeboxPrior
from ostinato.models.jukebox import HierarchicalVQVAE, Jukebox, LevelPrior, MetadataConditioner
from ostinato.nn.decoding import GenerationParams

pytestmark = pytest.mark.usefixtures("one_thread")

CARD, U = 64, 16  # codes per level; upper codes the upsampler's data uses
LM = {"preset": "tiny", "dim": 64, "num_heads": 4, "num_layers": 2, "ffn_dim": 128}
META = {"fields": ["genre", "composer"], "buckets": 64, "dropout": 0.1}
GENRES = ["reel", "chorale", "madrigal", "string quartet"]


def _train(prior: JukeboxPrior, batch, steps: int) -> list[float]:
    torch.manual_seed(0)
    random.seed(0)  # the metadata fields' dropout
    opt = torch.optim.Adam(prior.parameters(), 3e-3)
    history = []
    for _ in range(steps):
        loss = prior.losses(batch(16), train=True).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(round(float(loss.detach()), 3))
    return history


# -- the top prior and its metadata ------------------------------------------------------------------------------
TOP_W = 8


def _genre_batch(gen: torch.Generator, b: int) -> ArrayBatch:
    """Genre g's codes are drawn from codes 16 g .. 16 g + 15; the composer says nothing."""
    g = torch.randint(0, len(GENRES), (b,), generator=gen)
    codes = (g[:, None] * 16 + torch.randint(0, 16, (b, TOP_W), generator=gen))[:, None]
    metas = [{"genre": GENRES[int(i)], "composer": f"composer {int(c)}"}
             for i, c in zip(g, torch.randint(0, 3, (b,), generator=gen))]
    return ArrayBatch({"top": codes}, {"top": torch.full((b,), TOP_W)}, metas)


@pytest.fixture(scope="module")
def top_family() -> JukeboxPrior:
    torch.manual_seed(0)
    family = JukeboxPrior("top", card=CARD, lm=LM, metadata=META, cfg_dropout=0.2)
    family.model.window_frames.fill_(TOP_W)
    family.model.codes_per_second.fill_(64.0)  # the VQ-VAE of the last test
    gen = torch.Generator().manual_seed(0)
    history = _train(family, lambda b: _genre_batch(gen, b), 300)
    print("top prior CE, first -> last:", history[0], "->", history[-1], f"(genre known: {math.log(16):.3f})")
    return family.eval()


@pytest.fixture(scope="module")
def top(top_family) -> LevelPrior:
    return top_family.model


def test_the_top_prior_predicts_from_its_metadata(top):
    batch = _genre_batch(torch.Generator().manual_seed(1), 32)
    ce = prior_condition_ce(top, batch.arrays["top"], batch.meta)
    print("top prior CE with the true / another item's / no metadata:", {k: round(v, 3) for k, v in ce.items()})
    # no metadata: frame 0 is one of 64 codes instead of 16 (+ log 4 / 8 per code), the rest tell the genre
    assert ce["ce"] < math.log(16) + 0.15
    assert ce["ce_no_metadata"] > ce["ce"] + 0.08
    assert ce["ce_wrong_metadata"] > ce["ce"] + 0.3


def test_top_prior_samples_follow_the_prompt_and_the_seed(top):
    def sample(genre: str, seed: int) -> torch.Tensor:
        return top.generate(TOP_W, [{"genre": genre, "composer": "composer 0"}],
                            params=GenerationParams(seed=seed, cfg_scale=3.0))[0, 0]

    # the asked genre's codes (a prior deaf to its prompt: a quarter of them)
    hits = torch.stack([(sample(genre, seed) // 16) == i for i, genre in enumerate(GENRES) for seed in range(3)])
    assert float(hits.float().mean()) >= 0.85, hits.float().mean(1).tolist()
    assert not torch.equal(sample("reel", 0), sample("chorale", 0))  # same seed, other prompt
    assert not torch.equal(sample("reel", 0), sample("reel", 1))  # same prompt, other seed


def test_the_demo_genres_and_composers_get_their_own_rows():
    from ostinato.data.captions import DANCE_GENRES
    from ostinato.recipes.corpus import COMPOSERS, ESSEN_GENRES, STYLES, TRADITIONAL

    genres = ({s.genre for s in STYLES.values()} | {g for _, g in DANCE_GENRES} | set(ESSEN_GENRES.values())
              | {"german folk song", "irish air"})
    composers = set(COMPOSERS.values()) | {TRADITIONAL}
    m = MetadataConditioner(8, ["genre", "composer"], buckets=1024)  # the presets' buckets
    for j, values in enumerate((sorted(genres), sorted(composers))):
        ids = m.ids([{m.fields[j]: v} for v in values])[:, j]
        # one CRC-32 put "march" and "scottish strathspey" on one row: the prior could not tell them apart
        assert len({tuple(r) for r in ids.tolist()}) == len(values)


# -- an upsampler and the upper level's codes ---------------------------------------------------------------------
MID_W = 64  # 16 upper frames
TABLE = torch.randint(0, CARD, (U, 4), generator=torch.Generator().manual_seed(5))


def _upper_batch(gen: torch.Generator, b: int) -> ArrayBatch:
    """Middle frame t is TABLE[top code of t // 4, t % 4]: the upper codes say everything, a frame's own past
    only the rest of its group of 4 (context alone: log(16) / 4 = 0.69 nats a code)."""
    up = torch.randint(0, U, (b, 1, MID_W // 4), generator=gen)
    codes = TABLE[up[:, 0]].reshape(b, 1, MID_W)
    return ArrayBatch({"middle": codes, "top": up}, {"middle": torch.full((b,), MID_W),
                                                     "top": torch.full((b,), MID_W // 4)},
                      [{"genre": "reel"}] * b)


@pytest.fixture(scope="module")
def middle_family() -> JukeboxPrior:
    torch.manual_seed(0)
    family = JukeboxPrior("middle", card=CARD, lm=LM, metadata=META, cfg_dropout=0.1)
    family.model.window_frames.fill_(MID_W)
    family.model.codes_per_second.fill_(256.0)
    gen = torch.Generator().manual_seed(0)
    history = _train(family, lambda b: _upper_batch(gen, b), 80)
    print("middle upsampler CE, first -> last:", history[0], "->", history[-1], "(own context alone: 0.693)")
    return family.eval()


@pytest.fixture(scope="module")
def middle(middle_family) -> LevelPrior:
    return middle_family.model


def test_validation_logs_the_ce_without_each_condition(top_family, middle_family):
    """``JukeboxPrior.evaluate`` logs these next to ``valid/ce`` (what the GPU run's CSV shows)."""
    with torch.no_grad():
        batch = _genre_batch(torch.Generator().manual_seed(5), 16)
        ce, extra = float(top_family.losses(batch, train=False)), top_family.condition_losses(batch)
        assert set(extra) == {"ce_no_metadata"} and float(extra["ce_no_metadata"]) > ce + 0.08
        batch = _upper_batch(torch.Generator().manual_seed(5), 16)
        ce, extra = float(middle_family.losses(batch, train=False)), middle_family.condition_losses(batch)
        assert set(extra) == {"ce_no_metadata", "ce_shuffled_upper"}
        assert float(extra["ce_shuffled_upper"]) > ce + 1.0


def test_an_upsampler_predicts_from_the_upper_codes(middle):
    batch = _upper_batch(torch.Generator().manual_seed(1), 16)
    ce = prior_condition_ce(middle, batch.arrays["middle"], batch.meta, batch.arrays["top"])
    print("middle upsampler CE with the true / another item's upper codes:", {k: round(v, 3) for k, v in ce.items()})
    # the upper condition sat a whole window back in a prefix: after 80 steps the CE stayed at the context's 0.69
    assert ce["ce"] < 0.3
    assert ce["ce_shuffled_upper"] > ce["ce"] + 1.0


def test_an_upsampler_generates_what_the_upper_codes_say(middle):
    up = torch.randint(0, U, (2, 1, 2 * MID_W // 4), generator=torch.Generator().manual_seed(2))  # two windows
    codes = middle.generate(2 * MID_W, [{"genre": "reel"}] * 2, up, GenerationParams(seed=0, cfg_scale=3.0))
    want = TABLE[up[:, 0]].reshape(2, 1, 2 * MID_W)
    assert float((codes == want).float().mean()) >= 0.9
    assert not torch.equal(codes[0], codes[1])


def test_the_fast_decoder_adds_the_upper_codes_as_the_cached_one_does(middle):
    up = torch.randint(0, U, (2, 1, 2 * MID_W // 4), generator=torch.Generator().manual_seed(4))
    out = {backend: middle.generate(2 * MID_W, [{"genre": "reel"}] * 2, up,
                                    GenerationParams(temperature=0.0, cfg_scale=3.0, backend=backend))
           for backend in ("cache", "static")}
    assert torch.equal(out["cache"], out["static"])  # greedy: the same tokens on every backend
    assert float((out["static"] == TABLE[up[:, 0]].reshape(2, 1, -1)).float().mean()) >= 0.9


def test_the_condition_report_reads_array_shards(middle, tmp_path):
    """``prior_condition_report`` on array shards in ``ostinato encode``'s layout (what the GPU run prints)."""
    import json

    import webdataset as wds

    from ostinato.data.arrays import ArrayManifest, ArrayShard, ModelInfo, StreamInfo, encode_array
    from ostinato.evaluation.jukebox_checks import prior_condition_report

    batch = _upper_batch(torch.Generator().manual_seed(3), 12)
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as w:
        for i in range(12):
            w.write({"__key__": f"s{i:05d}", "top.npy": encode_array(batch.arrays["top"][i].to(torch.int16)),
                     "middle.npy": encode_array(batch.arrays["middle"][i].to(torch.int16)),
                     "json": json.dumps({"genre": "reel", "composer": "Traditional"}).encode()})
    ArrayManifest(shards=[ArrayShard("shard-000000.tar", 12, 12 * MID_W // 4)],
                  streams={"top": StreamInfo(64.0, 1, "int16", CARD), "middle": StreamInfo(256.0, 1, "int16", CARD)},
                  model=ModelInfo(id="synthetic", hash="0", kind="jukebox_vqvae", sample_rate=4096,
                                  channels=1)).save(tmp_path)
    report = prior_condition_report(middle, tmp_path, batches=2, batch_size=6)
    print("condition report on array shards:", report)
    assert report["items"] == 12 and report["ce"] < 0.3 and report["ce_shuffled_upper"] > report["ce"] + 1.0
    assert set(report) == {"ce", "ce_wrong_metadata", "ce_no_metadata", "ce_shuffled_upper", "items"}


def test_jukebox_diversity_reports_what_differs(top, middle):
    """The report the GPU run prints: an untrained bottom level on a trained top and middle; the prompts change
    the top codes, and the middle codes follow."""
    torch.manual_seed(0)
    vq = HierarchicalVQVAE(4096, ratios=[[4], [4, 4], [4, 4, 4]], card=CARD, dimension=8, n_filters=4)
    vq(torch.randn(2, 1, 4096))  # the codebooks' k-means init: before it every code decodes alike
    bottom = LevelPrior("bottom", card=CARD, lm=LM, metadata=META)
    bottom.codes_per_second.fill_(1024.0)
    bottom.window_frames.fill_(64)
    jukebox = Jukebox(vq, {"top": top, "middle": middle, "bottom": bottom}).eval()
    report = jukebox_diversity(jukebox, ["genre: reel", "genre: chorale"], [0, 1], 0.25)
    print("jukebox diversity:", report)
    for name in ("across_seeds", "across_prompts"):
        assert report[name]["pairs"] == 1 and report[name]["shared_codes_top"] < 0.5
        assert report[name]["waveform_corr_max"] < 0.999
