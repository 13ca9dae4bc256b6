"""`ostinato eval -d 2` (two gloo CPU ranks), `ostinato eval --slurm cluster=local,tasks=2` and the evaluation grid
on such a job (two submitit tasks) give the one-process run's clips, byte for byte, and
its metrics; the sbatch file of a two-node submission; reference statistics embedded by two ranks equal one
process's; more ranks than batches refused."""
from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ostinato.cli import main
from ostinato.engine.launch import SlurmOptions, free_port, sbatch_script
from ostinato.evaluation.runner import run_suite
from ostinato.evaluation.timing import StageClock, stage_shares
from ostinato.metrics.embeddings import load_backend
from ostinato.metrics.embeddings.cache import reference_stats
from tests.test_evaluation import _write_suite, parts  # noqa: F401  (the tiny MusicGen, codec and shards)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def suite(parts: dict) -> Path:  # noqa: F811
    root = parts["root"]
    return _write_suite(root / "dist.yaml", name="dist", kind="text_to_music", reference=str(root / "data" / "demo" /
                        "shards" / "test"), num_samples=4, seconds=0.5, batch_size=2,
                        embedding=f"codec:{parts['codec']}", generation={"cfg_scale": 3.0, "top_k": 20, "seed": 7},
                        melody_from_reference="auto",
                        metrics={"fad": {}, "fad_inf": {"num_points": 3}, "per_song_fad": {}, "chroma": {}})


@pytest.fixture(scope="module")
def one(parts: dict, suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("one")
    run_suite(suite, str(parts["model"]), out, cache=parts["cache"], progress=False)  # one thread, as the ranks
    return out


def _eval(parts: dict, suite: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:  # noqa: F811
    for key, value in parts["env"].items():  # the ranks take this process's environment
        monkeypatch.setenv(key, value)
    main(["eval", str(suite), "--model", str(parts["model"]), "--out", str(out), "--quiet", *extra])


def _same_run(one: Path, many: Path, world: int) -> None:
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (one, many))
    assert a["world_size"] == 1 and b["world_size"] == world and set(a["metrics"]) == set(b["metrics"])
    assert all(isinstance(a["metrics"][k], float) for k in ("fad", "fad_inf_r2", "chroma"))
    for key, value in a["metrics"].items():  # FAD-inf and per-song FAD of 4 clips are refused (None) on both
        assert b["metrics"][key] == value if value is None else math.isclose(b["metrics"][key], value, rel_tol=1e-9,
                                                                              abs_tol=1e-12), key
    # the gathered embeddings: FAD-inf's subsets and per-song frames, in item order
    assert b["fad_inf_curve"] == a["fad_inf_curve"] and all(isinstance(f, float) for f in a["fad_inf_curve"]["fad"])
    assert b["per_song_fad"] == a["per_song_fad"] and b["per_song_fad"]["ids"] == ["0", "1", "2", "3"]
    for i in range(4):  # item i: the same clip whichever rank made it
        assert (many / "generated" / f"00{i}.wav").read_bytes() == (one / "generated" / f"00{i}.wav").read_bytes()
    assert a["items"] == b["items"]


def test_two_ranks_give_the_one_process_run(parts: dict, suite: Path, one: Path, tmp_path: Path,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    _eval(parts, suite, tmp_path / "two", monkeypatch, "-d", "2")
    assert capfd.readouterr().out.count("report: ") == 1  # rank 0 alone reports
    _same_run(one, tmp_path / "two", 2)
    ranks = json.loads((tmp_path / "two" / "metrics.json").read_text())["ranks"]
    assert [(r["rank"], r["items"]) for r in ranks] == [(0, 2), (1, 2)]  # each rank made one batch of 2
    # the codec's decoding is its own stage, out of generate's time
    assert all(r["seconds"]["generate"] > 0 and r["seconds"]["decode"] > 0 and r["seconds"]["embed"] > 0
               for r in ranks)
    table = stage_shares(tmp_path / "two" / "metrics.json")
    assert table.startswith("2 rank(s), 4 items") and "| generate |" in table and "items per rank: 2, 2" in table
    assert "| decode |" in table


def test_a_stage_moves_a_measured_part_to_another() -> None:
    clock = StageClock()
    clock.seconds = {"generate": 3.0}
    clock.move("generate", "decode", 1.25)
    clock.move("generate", "decode", 9.0)  # never more than the stage measured
    assert clock.seconds == {"generate": 0.0, "decode": 3.0}


def test_slurm_job_tasks_are_the_ranks(parts: dict, suite: Path, one: Path, tmp_path: Path,  # noqa: F811
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # cluster=local: submitit's local executor, the same job and task environment as SLURM's on this machine (the
    # test SLURM node's CPU count follows whoever started it: 1 on a restricted cpuset, too few for two tasks)
    _eval(parts, suite, tmp_path / "job", monkeypatch, "--slurm", "cluster=local,tasks=2,cpus=1,time=5")
    assert "done; report: " in capsys.readouterr().out
    _same_run(one, tmp_path / "job", 2)
    assert len(list((tmp_path / "job" / "slurm").glob("*_log.out"))) == 2  # submitit's log of each task


def test_sbatch_refusal_is_one_line(parts: dict, suite: Path, tmp_path: Path,  # noqa: F811
                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:  # no such partition, or no controller running here: sbatch says no
        main(["eval", str(suite), "--model", str(parts["model"]), "--out", str(tmp_path / "x"), "--slurm",
              "tasks=2,partition=no_such_partition"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after sbatch's own lines: ours, with its reason
    assert last.startswith("ostinato: error: --slurm tasks=2,partition=no_such_partition: the job was not submitted: ")
    # sbatch's own reason, whichever it is (CI may run this before any test has started the controller)
    assert "Batch job submission failed: " in last[100:] and "Traceback" not in last


def test_eval_sweep_on_a_slurm_job(parts: dict, suite: Path, one: Path, tmp_path: Path,  # noqa: F811
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from grids.eval_sweep import main as sweep_main

    for key, value in parts["env"].items():
        monkeypatch.setenv(key, value)
    sweep_main(["--model", str(parts["model"]), "--suite", str(suite), "--out", str(tmp_path / "sweep"),
                "--grid", "generation.cfg_scale=3.0", "--slurm", "cluster=local,tasks=2,cpus=1,time=5"])
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())["rows"]
    assert [r["settings"] for r in rows] == [{"generation.cfg_scale": 3.0}]  # the suite's own setting: one's run
    _same_run(one, tmp_path / "sweep" / "cfg_scale=3.0", 2)


def _stats_worker(rank: int, port: int, codec: str, shards: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        mu, sigma, n = reference_stats(load_backend(f"codec:{codec}"), shards, out, progress=False, sharded=True)
        torch.save({"mu": mu, "sigma": sigma, "n": n}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_reference_statistics_shared_by_two_ranks(parts: dict, tmp_path: Path) -> None:  # noqa: F811
    shards = str(parts["root"] / "data" / "demo" / "shards" / "test")
    mu, sigma, n = reference_stats(load_backend(f"codec:{parts['codec']}"), shards, None, progress=False)
    # fork: a spawned child would re-import torch and transformers (slow here)
    mp.start_processes(_stats_worker, args=(free_port(), parts["codec"], shards, str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    for rank in (0, 1):  # each embedded 4 of the 8 clips; the summed moments are one process's
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n"] == n
        torch.testing.assert_close(got["mu"], mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["sigma"], sigma, rtol=1e-9, atol=1e-12)
    assert len(list(tmp_path.glob("**/*.json"))) == 1  # rank 0 alone wrote the cache entry


def test_more_ranks_than_batches_is_refused(parts: dict, suite: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(suite), "--model", str(parts["model"]), "-d", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "dist.yaml: 4 items in batches of batch_size=2 make 2 batches, fewer than the 3 ranks" in err


def test_sbatch_file_of_a_two_node_submission(tmp_path: Path) -> None:
    options = SlurmOptions.parse("nodes=2,gpus=8,partition=learn,time=120")
    assert options.world_size == 16
    script = sbatch_script(options, tmp_path)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=learn", "#SBATCH --time=120"):
        assert line in script, line
    assert "srun" in script and "submitit.core._submit" in script
    with pytest.raises(ValueError, match="'gpu=8' is not KEY=VALUE with KEY one of nodes, gpus"):
        SlurmOptions.parse("gpu=8")
