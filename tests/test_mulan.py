"""MuLaN: contrastive losses (against hand-written references, on two gloo ranks), retrieval metrics, the embedding
quantizer, an `ostinato train experiment=mulan_tiny` run that exports and loads, and the `mulan:` backend."""
from __future__ import annotations

import csv
import json
import math
import os
import socket
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ostinato.nn.contrastive import (ContrastiveLoss, RetrievalMetrics, retrieval_metrics, sigmoid_contrastive_loss,
                                     softmax_contrastive_loss)
from ostinato.models.mulan import QUANTIZER_FORMAT, MuLaNQuantizer
from tests.runner import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pairs(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    t = F.normalize(a + 0.8 * torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return a, t


# ------------------------------------------------------------------------------------------------------- losses


def _softmax_reference(a: torch.Tensor, t: torch.Tensor, scale: float) -> float:
    n = len(a)
    sim = [[scale * float(a[i] @ t[j]) for j in range(n)] for i in range(n)]
    rows = [-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)]
    cols = [-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)]
    return 0.5 * (sum(rows) / n + sum(cols) / n)


def _sigmoid_reference(a: torch.Tensor, t: torch.Tensor, scale: float, bias: float) -> float:
    n = len(a)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-z * (scale * float(a[i] @ t[j]) + bias)))
    return total / n


def test_softmax_loss_matches_reference_is_symmetric_and_learns_its_temperature() -> None:
    a, t = _pairs(5, 8, seed=0)
    s = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    loss = softmax_contrastive_loss(a, t, s)
    assert math.isclose(float(loss), _softmax_reference(a, t, 1 / 0.07), rel_tol=1e-12)
    assert math.isclose(float(softmax_contrastive_loss(t, a, s)), float(loss), rel_tol=1e-12)  # symmetric
    inputs = (a.clone().requires_grad_(), t.clone().requires_grad_(), s.clone().requires_grad_())
    assert torch.autograd.gradcheck(softmax_contrastive_loss, inputs)

    module = ContrastiveLoss("softmax")
    assert math.isclose(float(module(a.float(), t.float()).detach()), float(loss), rel_tol=1e-5)
    aligned = torch.eye(4, 8)
    module(aligned, aligned).backward()  # sharper is better when pairs are exact: the scale grows
    assert module.logit_scale.grad is not None and float(module.logit_scale.grad) < 0
    shuffled = ContrastiveLoss("softmax")
    shuffled(aligned, aligned.roll(1, dims=0)).backward()  # ...and shrinks when every pair is wrong
    assert float(shuffled.logit_scale.grad) > 0


def test_sigmoid_loss_matches_reference_and_learns_temperature_and_bias() -> None:
    a, t = _pairs(5, 8, seed=1)
    s, b = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    loss = sigmoid_contrastive_loss(a, t, s, b)
    assert math.isclose(float(loss), _sigmoid_reference(a, t, 10.0, -10.0), rel_tol=1e-12)
    assert math.isclose(float(sigmoid_contrastive_loss(t, a, s, b)), float(loss), rel_tol=1e-12)
    inputs = (a.clone().requires_grad_(), t.clone().requires_grad_(), s.clone().requires_grad_(),
              b.clone().requires_grad_())
    assert torch.autograd.gradcheck(sigmoid_contrastive_loss, inputs)
    module = ContrastiveLoss("sigmoid")
    assert math.isclose(float(module.temperature), 0.1, rel_tol=1e-6)
    module(a.float(), t.float()).backward()
    assert float(module.bias.grad) < 0  # at b = -10 the positives pull the bias up
    assert module.logit_scale.grad is not None and module.logit_scale.grad != 0


def test_loss_clamps_temperature_and_stays_finite_on_degenerate_batches() -> None:
    module = ContrastiveLoss("softmax", min_temperature=0.01)
    with torch.no_grad():
        module.logit_scale.fill_(50.0)  # e^50: would overflow the logits unclamped
    a, t = _pairs(6, 8, seed=2, dtype=torch.float32)
    assert torch.isfinite(module(a, t))
    assert math.isclose(float(module.logit_scale.detach()), math.log(100), rel_tol=1e-6)
    assert math.isclose(float(module.temperature), 0.01, rel_tol=1e-5)
    for kind in ("softmax", "sigmoid"):
        for same in (torch.ones(8, 4), torch.zeros(8, 4)):  # all-equal and all-zero embeddings
            m = ContrastiveLoss(kind)
            x = same.clone().requires_grad_()
            loss = m(x, x)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
            if kind == "softmax":
                assert math.isclose(float(loss.detach()), math.log(8), rel_tol=1e-6)  # uniform: log N
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(8, 16).to(torch.bfloat16)
        loss = ContrastiveLoss("softmax")(x, x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ------------------------------------------------------------------------------------------- retrieval metrics


def test_retrieval_metrics_perfect_random_and_collapsed() -> None:
    a = F.normalize(torch.randn(50, 32), dim=-1)
    perfect = retrieval_metrics(a, a)
    for way in ("t2a", "a2t"):
        assert float(perfect[f"{way}_r1"]) == 1.0 and float(perfect[f"{way}_r10"]) == 1.0
        assert float(perfect[f"{way}_median_rank"]) == 1.0
    assert float(perfect["chance_r10"]) == 10 / 50 and float(perfect["n"]) == 50

    g = torch.Generator().manual_seed(0)
    n = 400
    rnd = retrieval_metrics(torch.randn(n, 64, generator=g), torch.randn(n, 64, generator=g))
    for way in ("t2a", "a2t"):
        assert abs(float(rnd[f"{way}_r10"]) - 10 / n) < 0.02
        assert abs(float(rnd[f"{way}_median_rank"]) - (n + 1) / 2) < 0.15 * n

    same = torch.ones(20, 8)  # a collapsed model: every score ties; expected random tie-breaking = chance
    flat = retrieval_metrics(same, same)
    assert math.isclose(float(flat["t2a_r10"]), 0.5) and math.isclose(float(flat["a2t_r1"]), 1 / 20)
    assert float(flat["t2a_median_rank"]) == 10.5

    metric = RetrievalMetrics()
    for chunk in range(5):
        metric.update(a[chunk * 10:(chunk + 1) * 10], a[chunk * 10:(chunk + 1) * 10])
    assert float(metric.compute()["t2a_r1"]) == 1.0 and metric.embeddings()[0].shape == (50, 32)


# ------------------------------------------------------------------------------------------- two gloo ranks


def _towers(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 8), torch.nn.Linear(5, 8)


def _global_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)


def _loss_and_grads(kind: str, xa: torch.Tensor, xt: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    audio, text = _towers()
    criterion = ContrastiveLoss(kind)
    loss = criterion(audio(xa), text(xt))
    loss.backward()
    params = {"audio.weight": audio.weight, "text.bias": text.bias, "logit_scale": criterion.logit_scale}
    if criterion.bias is not None:
        params["bias"] = criterion.bias
    return float(loss.detach()), {k: p.grad.clone() for k, p in params.items()}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        xa, xt = _global_batch()
        half = len(xa) // world
        results = {}
        for kind in ("softmax", "sigmoid"):
            loss, grads = _loss_and_grads(kind, xa[rank * half:(rank + 1) * half], xt[rank * half:(rank + 1) * half])
            for g in grads.values():  # what DDP does to every gradient
                dist.all_reduce(g)
                g /= world
            results[kind] = (loss, grads)
        a, t = _pairs(9, 6, seed=4, dtype=torch.float32)
        mine = slice(0, 4) if rank == 0 else slice(4, 9)  # uneven ranks
        metric = RetrievalMetrics()
        metric.update(a[mine], t[mine])
        results["retrieval"] = {k: float(v) for k, v in metric.compute().items()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_negatives_with_gradients_like_one_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: the ranks run backward, which a forked child refuses once its parent (the xdist worker, after
    # another file's tests) has started autograd's threads
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    xa, xt = _global_batch()
    for kind in ("softmax", "sigmoid"):
        loss, grads = _loss_and_grads(kind, xa, xt)
        for r in ranks:
            rank_loss, rank_grads = r[kind]
            assert abs(rank_loss - loss) < 1e-5, (kind, rank_loss, loss)
            for name, g in grads.items():
                assert torch.allclose(rank_grads[name], g, atol=1e-5, rtol=1e-5), (kind, name)
    a, t = _pairs(9, 6, seed=4, dtype=torch.float32)
    single = {k: float(v) for k, v in retrieval_metrics(a, t).items()}
    assert ranks[0]["retrieval"] == pytest.approx(single) and ranks[1]["retrieval"] == pytest.approx(single)


# --------------------------------------------------------------------------------------------------- quantizer


def _clustered(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(6, d, generator=g), dim=-1)
    return F.normalize(centres[torch.randint(0, 6, (n,), generator=g)] + 0.1 * torch.randn(n, d, generator=g), dim=-1)


def test_quantizer_fits_deterministic_tokens_with_independent_namespaces(tmp_path: Path) -> None:
    emb = _clustered(120, 16, seed=0)
    spaces = {"semantic": {}, "coarse": {"n_q": 2}}
    q = MuLaNQuantizer(16, n_q=3, card=8, namespaces=spaces, kmeans_iters=10).fit_(emb, iters=3)
    tokens = q.tokens(emb[:10], "semantic")
    assert tokens.shape == (10, 3) and tokens.dtype == torch.int64 and int(tokens.max()) < 8
    assert q.tokens(emb[:10], "coarse").shape == (10, 2)
    assert torch.equal(q.tokens(emb[:10], "semantic"), tokens)  # deterministic, no codebook update
    errors = [float((q.embedding(q.tokens(emb, "semantic")[:, :k], "semantic") - emb).norm(dim=-1).mean())
              for k in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]  # each stage quantizes what the previous left

    again = MuLaNQuantizer(16, n_q=3, card=8, namespaces=spaces, kmeans_iters=10).fit_(emb, iters=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in q.state_dict().items())  # same seed, same fit
    semantic = {k: v.clone() for k, v in q.state_dict().items() if k.startswith("quantizers.semantic.")}
    coarse = q.quantizers["coarse"].layers[0].codebook.embed.clone()
    q.fit_(_clustered(120, 16, seed=5), namespaces=["coarse"], iters=3)  # refit one namespace: the other stays
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in semantic.items())
    assert not torch.equal(q.quantizers["coarse"].layers[0].codebook.embed, coarse)
    assert not torch.equal(q.quantizers["semantic"].layers[0].codebook.embed,
                           q.quantizers["coarse"].layers[0].codebook.embed)

    q.train()
    assert not q.training  # frozen: always eval outside fit_
    path = q.save(tmp_path / "q.safetensors")
    loaded = MuLaNQuantizer.load(path)
    assert torch.equal(loaded.tokens(emb, "coarse"), q.tokens(emb, "coarse"))
    assert torch.equal(loaded.tokens(emb, "semantic"), q.tokens(emb, "semantic"))
    assert loaded.card("semantic") == 8 and loaded.config["card"] == 8

    # a quantizer file written before the codebook size was named card (config key bins) still loads
    from safetensors.torch import load_file, save_file
    old = dict(q.config, bins=q.config["card"], namespaces={"semantic": {}, "coarse": {"n_q": 2, "bins": 8}})
    del old["card"]
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"),
              metadata={"format": QUANTIZER_FORMAT, "config": json.dumps(old), "source": ""})
    older = MuLaNQuantizer.load(tmp_path / "old.safetensors")
    assert (older.card("semantic"), older.card("coarse"), older.n_q("coarse")) == (8, 8, 2)
    assert torch.equal(older.tokens(emb, "coarse"), q.tokens(emb, "coarse"))
    with pytest.raises(KeyError, match="namespace 'acoustic'"):
        q.tokens(emb, "acoustic")
    with pytest.raises(RuntimeError, match="not fitted"):
        MuLaNQuantizer(16, n_q=1, card=4).tokens(emb, "semantic")


# ------------------------------------------------------------------------------------ training, export, backend

RUN = ["experiment=mulan_tiny", "data.segment_seconds=0.5", "data.eval_segment_seconds=1.0", "data.batch_size=8",
       "data.eval_batch_size=8", "data.batches_per_epoch=6", "trainer.max_steps=6", "trainer.checkpoint_every_steps=6",
       "family.audio.window_seconds=0.5", "family.audio.depth=1", "family.audio.patch_time=4",
       "family.dim=32", "family.audio.dim=32", "family.audio.ffn_dim=64", "data.num_workers=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> dict:
    from ostinato.engine.weights import export

    root = tmp_path_factory.mktemp("mulan")
    env = {**env, "OSTINATO_OUTPUTS": str(root / "out"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    train(env, *RUN)
    (folder,) = (root / "out" / "xps").iterdir()  # private outputs: the one XP (no second CLI start to ask dora)
    out = root / "export"
    export(folder, out)
    return {"folder": folder, "export": out, "data": Path(env["OSTINATO_DATA"])}


def test_train_logs_finite_loss_and_retrieval_then_exports_and_loads(trained: dict) -> None:
    import lightning.pytorch as pl

    import ostinato
    from ostinato.models.mulan import MuLaN

    with open(trained["folder"] / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    valid = [r for r in rows if r.get("valid/t2a_r10")]
    assert len(valid) == 2  # validate_first, then the end of the only epoch
    for key in ("t2a_r1", "t2a_r10", "a2t_r1", "a2t_r10", "t2a_median_rank", "a2t_median_rank", "loss"):
        assert all(math.isfinite(float(r[f"valid/{key}"])) for r in valid), key
    assert float(valid[-1]["valid/n"]) == 16 and float(valid[-1]["valid/chance_r10"]) == 10 / 16
    ckpt = torch.load(trained["folder"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(".encoder." in k for k in ckpt["state_dict"])  # the frozen MiniLM stays out

    assert any(k.startswith("model.audio.") for k in ckpt["state_dict"])  # the wrapper holds its MuLaN as .model
    module = ostinato.load(trained["export"])  # the inference model, not its training wrapper
    assert type(module) is MuLaN and not isinstance(module, pl.LightningModule)
    assert module.sample_rate == 24000 and module.channels == 1
    from_xp = ostinato.load(trained["folder"])  # the EMA weights of the checkpoint, as the export
    assert type(from_xp) is MuLaN
    wav = torch.randn(3, 1, 24000) * 0.1
    with torch.no_grad():
        emb = module.embed_audio(wav, 24000)
        assert torch.allclose(emb, from_xp.embed_audio(wav, 24000))
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(3))


def test_family_config_errors_name_the_key() -> None:
    from ostinato.families.mulan import MuLaNFamily

    with pytest.raises(ValueError, match=r"family.audio: unknown keys \['depht'\]"):
        MuLaNFamily(audio={"depht": 1})
    with pytest.raises(ValueError, match=r"family.loss: unknown keys \['temperature'\]"):
        MuLaNFamily(dim=16, audio={"dim": 16, "depth": 1}, loss={"temperature": 0.1})
    with pytest.raises(ValueError, match="family.loss.kind='cosine'"):
        MuLaNFamily(dim=16, audio={"dim": 16, "depth": 1}, loss={"kind": "cosine"})
    family = MuLaNFamily(sample_rate=16000, dim=16, audio={"dim": 16, "depth": 1, "window_seconds": 1.0})
    family._trainer = SimpleNamespace(datamodule=SimpleNamespace(sample_rate=16000, segment_seconds=2.0))
    with pytest.raises(ValueError, match=r"data.segment_seconds=2.0 .*family.audio.window_seconds=1.0"):
        family.setup("fit")


def test_mulan_backend_embeds_audio_and_text_in_one_space(trained: dict) -> None:
    from ostinato.models.mulan import fit_mulan_quantizer
    from ostinato.metrics.embeddings import load_backend
    from tests.synth import tone

    backend = load_backend(f"mulan:{trained['export']}")
    assert backend.name == "mulan" and backend.has_text and backend.sample_rate == 24000 and backend.channels == 1
    assert backend.window_seconds == 0.5 and backend.dim == 32
    frames = backend.embed_audio(tone(440.0, 1.2, 16000, channels=2)[None], 16000)  # resampled, mixed to mono
    assert len(frames) == 1 and frames[0].shape == (3, 32)  # 0-0.5, 0.5-1.0, 0.7-1.2 s
    text = backend.embed_text(["a chorale for organ", "an irish reel"])
    assert text.shape == (2, backend.dim) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    assert torch.allclose(frames[0].norm(dim=-1), torch.ones(3), atol=1e-5)
    short = tone(440.0, 0.4, 24000)[None]  # within one window: exactly MuLaN's own embedding
    assert torch.allclose(backend.embed(short)[0][0], backend.mulan.embed_audio(short, 24000)[0], atol=1e-6)
    assert backend.id() == load_backend(f"mulan:{trained['export']}").id()

    quantizer = fit_mulan_quantizer(trained["export"], trained["data"] / "demo" / "shards" / "train", n_q=2, card=4,
                                    segment_seconds=1.0, out=trained["export"] / "mulan_quantizer.safetensors")
    emb = backend.mulan.embed_text(["clip 3"])
    assert quantizer.tokens(emb, "semantic").shape == (1, 2) and quantizer.tokens(emb, "coarse").shape == (1, 2)
    loaded = MuLaNQuantizer.load(trained["export"] / "mulan_quantizer.safetensors")
    assert torch.equal(loaded.tokens(emb, "coarse"), quantizer.tokens(emb, "coarse"))


def test_text_towers_scratch_and_finetuned_minilm() -> None:
    from ostinato.models.mulan import TextTower

    texts = ["a chorale for organ", "an irish reel. bpm: 120", ""]
    scratch = TextTower(8, model="scratch", dim=16, depth=1, heads=2)
    assert scratch.embed.num_embeddings == len(scratch.tokenizer) == 30522  # the MiniLM tokenizer's vocabulary
    out = scratch(texts)
    out.sum().backward()
    assert out.shape == (3, 8) and scratch.embed.weight.grad is not None
    tuned = TextTower(8, train=True)
    assert any(k.startswith("encoder.") for k in tuned.state_dict())  # trained: checkpointed and exported
    tuned(texts).sum().backward()
    assert tuned.encoder.embeddings.word_embeddings.weight.grad is not None
    frozen = TextTower(8)
    assert set(frozen.state_dict()) == {"proj.weight", "proj.bias"}
    assert torch.equal(frozen(texts[:2]), frozen(texts[:2]))  # the second call reads the cache


def test_demo_prints_held_out_retrieval_of_the_trained_mulan(trained: dict) -> None:
    from ostinato.demo import mulan_retrieval

    metrics = mulan_retrieval(str(trained["export"]), trained["data"] / "demo" / "shards" / "test")
    assert metrics["n"] == 16 and metrics["chance_r10"] == 10 / 16
    for key in ("t2a_r10", "a2t_r10"):
        assert 0.0 <= metrics[key] <= 1.0
    assert 1.0 <= metrics["t2a_median_rank"] <= 16.0


def test_retrieval_suite_ranks_clips_against_their_captions(trained: dict, tmp_path: Path) -> None:
    """``ostinato eval mulan_demo --model MULAN``: the registry picks MuLaN's producer; the numbers are those of
    the model's own embeddings; a suite kind MuLaN cannot produce is refused in one line."""
    import json as json_

    import ostinato
    from ostinato.evaluation.retrieval import retrieval_scores
    from ostinato.evaluation.runner import run_suite
    from ostinato.evaluation.suite import SuiteError, load_suite
    from ostinato.models.mulan import mulan_embeddings

    test = trained["data"] / "demo" / "shards" / "test"
    result = run_suite("mulan_demo", str(trained["export"]), tmp_path / "eval", progress=False,
                       overrides=[f"reference={test}", "seconds=1.0", "batch_size=4"])
    m = result["metrics"]
    assert result["kind"] == "retrieval" and result["settings"]["family"] == "mulan" and m["n"] == 16
    for way in ("t2a", "a2t"):
        assert all(0 <= m[f"{way}_r{k}"] <= 1 for k in (1, 5, 10))
        assert m[f"{way}_r1"] <= m[f"{way}_r5"] <= m[f"{way}_r10"]
        assert 1 <= m[f"{way}_median_rank"] <= 16 and 1 <= m[f"{way}_mean_rank"] <= 16
    assert m["chance_r5"] == 5 / 16 and m["chance_mean_rank"] == 8.5
    # the model ranks its own training captions (the train split) better than chance: it learnt the pairs
    own = run_suite("mulan_demo", str(trained["export"]), tmp_path / "eval_train", progress=False,
                    overrides=[f"reference={trained['data'] / 'demo' / 'shards' / 'train'}", "seconds=1.0",
                               "batch_size=8"])["metrics"]
    assert own["t2a_mean_rank"] < own["chance_mean_rank"] - 1 and own["t2a_r10"] > own["chance_r10"]
    assert (own["t2a_mean_rank"] + own["a2t_mean_rank"]) / 2 < own["chance_mean_rank"]
    saved = json_.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["metrics"] == m and saved["items"][3]["prompt"] and (tmp_path / "eval" / "report.md").is_file()
    # the same numbers from the model's own embeddings of the same clips and captions
    mulan = ostinato.load(trained["export"])
    emb = mulan_embeddings(mulan, str(test), segment_seconds=1.0, with_text=True)
    expected = retrieval_scores(emb[:16], emb[16:], (1, 5, 10))
    assert all(abs(expected[k] - m[k]) < 1e-6 for k in expected), (expected, m)

    with pytest.raises(SuiteError, match=r"demo.yaml: kind: a text_to_music suite cannot run here: --model .* is a "
                                         r"MuLaN, which runs retrieval suites \(mulan_demo\)$"):
        run_suite("demo", str(trained["export"]), tmp_path / "x", progress=False)
    with pytest.raises(SuiteError, match=r"metrics.retrieval \(set by --set\): retrieval ranks clips against"):
        load_suite("demo", {"metrics": {"retrieval": {}}})
    # a caption file: line i is clip i's caption, in place of the shards' (here: reversed, so the pairs change)
    captions = [it["prompt"] for it in saved["items"]][::-1]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    result = run_suite("mulan_demo", str(trained["export"]), tmp_path / "eval_file", progress=False,
                       overrides=[f"reference={test}", "seconds=1.0", "batch_size=4",
                                  f"prompts_file={tmp_path / 'captions.txt'}"])
    assert [it["prompt"] for it in result["items"]] == captions and result["metrics"]["n"] == 16
    expected = retrieval_scores(emb[:16], mulan.embed_text(captions).to(emb.dtype), (1, 5, 10))
    assert all(abs(expected[k] - result["metrics"][k]) < 1e-5 for k in expected), (expected, result["metrics"])
    assert result["metrics"] != m  # the file's captions were ranked, not the shards'
    with pytest.raises(SuiteError, match=r"mulan_demo.yaml: prompts \(set by --set\): 1 captions for "
                                         r"num_samples=2 clips: caption i is clip i's"):
        load_suite("mulan_demo", ["prompts=[a]", "num_samples=2"])
    with pytest.raises(SuiteError, match=r"metrics.retrieval.ks"):
        load_suite("mulan_demo", ["metrics.retrieval.ks=[0]"])
