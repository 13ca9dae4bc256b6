"""The training console (ostinato.engine.console): one progress bar with the step and its planned total, no
third-party message a user cannot act on, every other warning still shown."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from lightning.fabric.utilities.warnings import PossibleUserWarning

from ostinato.engine.console import LIGHTNING_LOGGERS, NOISE, install

# what Lightning and torch print (their own words, shortened): one per NOISE entry
SAMPLES = {
    "Using ModelCheckpoint with manual optimization": "Using ModelCheckpoint with manual optimization and "
                                                       "every_n_train_steps, but no pre-optimization state was saved.",
    "The `srun` command": "The `srun` command is available on your system but is not used. HINT: srun python x",
    "IterableDataset": "Your `IterableDataset` has `__len__` defined. In combination with multi-process data",
    "validation_step": "You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.",
    "ckpt_path": "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided "
                 "during `Trainer` instantiation. Please add the following callbacks: ['EvaluationCallback'].",
    "LeafSpec": "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.",
    "meshgrid": "torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument.",
    "jit": "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.",
    "available": "GPU available: False, used: False",
    "Tip": "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    "limit_val": "`Trainer(limit_val_batches=1)` was configured so 1 batch will be used.",
    "stopped": "`Trainer.fit` stopped: `max_steps=4` reached.",
    "summary callbacks": "Trainer already configured with model summary callbacks: [OneLineSummary].",
    "restoring": "Restoring states from the checkpoint path at /x/checkpoints/last.ckpt",
    "list": "Total length of `list` across ranks is zero. Please make sure this was your intention.",
    "distributed": "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2",
    "banner": "-" * 100 + "\ndistributed_backend=gloo\nAll distributed processes registered. Starting with 2 processes",
}
ACTIONABLE = "The number of training batches (3) is smaller than the logging interval Trainer(log_every_n_steps=10)"


def _sample(noise) -> str:
    found = [text for text in SAMPLES.values() if re.match(noise.message, text)]
    assert len(found) == 1, f"one sample per NOISE entry: {noise.message} has {found}"
    return found[0]


def test_noise_is_dropped_by_category_and_message_and_other_warnings_stay():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        install()
        install()  # idempotent: the demo trains several times in one process
        for noise in NOISE:
            if noise.category is not None:
                warnings.warn(_sample(noise), noise.category)
        warnings.warn(ACTIONABLE, PossibleUserWarning)  # the user can lower trainer.log_every_n_steps: it stays
        warnings.warn(_sample(NOISE[0]), RuntimeWarning)  # the same words in another category stay too
        warnings.warn("torch.meshgrid is fine, " + SAMPLES["meshgrid"], UserWarning)  # matched at the start only
    assert [str(w.message) for w in seen] == [ACTIONABLE, _sample(NOISE[0]),
                                              "torch.meshgrid is fine, " + SAMPLES["meshgrid"]]


def test_lightning_info_lines_are_dropped_and_others_kept(caplog):
    install()
    for name in LIGHTNING_LOGGERS:
        assert sum(f.__class__.__name__ == "_DropNoise" for f in logging.getLogger(name).filters) == 1, name
    logger = logging.getLogger(LIGHTNING_LOGGERS[0])
    with caplog.at_level(logging.INFO, logger=LIGHTNING_LOGGERS[0]):
        for noise in NOISE:
            if noise.category is None:
                logger.info(_sample(noise))
        logger.info("`Trainer.fit` stopped: `max_time=0:10:00` reached.")  # a stop the bar does not show
    assert [r.getMessage() for r in caplog.records] == ["`Trainer.fit` stopped: `max_time=0:10:00` reached."]


@pytest.fixture(scope="module")
def codec_console(env):
    """A tiny GAN-family run with the console as users get it (progress bar and summary on), checkpointing every
    two manual-optimization steps, and fewer steps per epoch than the logging interval."""
    run = ["experiment=codec_tiny", "trainer.max_steps=7", "data.batches_per_epoch=3", "data.num_workers=0",
           "data.batch_size=2", "data.eval_batch_size=2", "trainer.limit_val_batches=1",
           "trainer.checkpoint_every_steps=2", "logger=csv"]
    procs = [subprocess.run([sys.executable, "-m", "ostinato.cli", "train", *run], env=env, capture_output=True,
                            text=True, timeout=300) for _ in range(2)]  # the second resumes from last.ckpt
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return procs


def _lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The console's lines, a bar's redraws (carriage returns) apart."""
    return [line for chunk in (proc.stdout + proc.stderr).splitlines() for line in chunk.split("\r") if line.strip()]


def test_train_console_is_one_bar_with_the_planned_total_and_no_noise(codec_console):
    proc, resumed = codec_console
    console, lines = proc.stdout + proc.stderr, _lines(proc)
    for noise in NOISE:
        assert not [line for line in lines + _lines(resumed) if re.search(noise.message, line)], noise.message
    assert "Epoch" not in console and "/-" not in console and "┏" not in console  # no epoch bar, no tables
    assert "validate:" not in console  # validate_first's own bar is for terminals: a log keeps no cleared bar
    bars = [line for line in lines if line.startswith("step ")]
    assert bars and all(re.match(r"step \d/7 ", line) for line in bars), bars[-3:]
    last = bars[-1]
    assert last.startswith("step 7/7 ") and "steps/s" in last, last
    assert re.search(r"train/mel [\d.]+ valid/mel_distance [\d.]+ lr 0\.001", last), last  # loss, main metric, lr
    assert "log_every_n_steps" in console  # a warning the user can act on stays
    assert re.search(r"model: [\d.]+ K parameters .*model Codec", console)
    assert "untrained baseline: valid/mel_distance" in console
    last_line = re.search(r"XP (\w+) in (\S+) \(step 7\): ostinato export \1 OUT$",
                          proc.stderr.strip().splitlines()[-1])
    assert last_line and (Path(last_line[2]) / "checkpoints" / "last.ckpt").is_file()  # what export, generate take
    # the last step was checkpointed (7 is no multiple of trainer.checkpoint_every_steps=2): the rerun trains nothing
    assert "resuming" in resumed.stderr and not [line for line in _lines(resumed) if line.startswith("step ")]
    assert resumed.stderr.strip().splitlines()[-1].endswith(f"(step 7): ostinato export {last_line[1]} OUT")


def test_a_run_without_validation_trains_quietly(env):
    """data.valid=null (and test): no validation by design, was a ValueError traceback from val_dataloader."""
    from tests.runner import train

    proc = train(env, "family=debug", "data.valid=null", "data.test=null", "trainer.max_steps=2",
                 "trainer.validate_first=true", "trainer.progress_bar=true")
    lines = _lines(proc)
    assert not [line for line in lines if any(re.search(n.message, line) for n in NOISE)], lines
    assert "untrained baseline" not in proc.stderr
    assert re.search(r"XP (\w+) in \S+ \(step 2\): ostinato export \1 OUT$", lines[-1]), lines[-1]


def test_the_bar_draws_on_a_terminal_that_reports_no_size(env):
    """A pseudo-terminal nobody sized (0 x 0: CI runners, `script`) made tqdm draw nothing at all."""
    import os
    import pty

    from tests.runner import cli_args

    master, slave = pty.openpty()  # a fresh pty reports 0 columns and 0 rows
    proc = subprocess.Popen([sys.executable, "-m", "ostinato.cli", "train", *cli_args(
        ["family=debug", "trainer.max_steps=3", "trainer.progress_bar=true", "trainer.validate_first=false"])],
                            env=env, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    console = b"".join(chunks).decode(errors="replace")
    assert re.search(r"step 3/3 .*steps/s", console), console[-2000:]


LOAD_A_TEXT_ENCODER = """
import sys
from transformers import BertConfig, BertModel
if sys.argv[1] == "quiet":
    from ostinato.engine.console import install
    install()
folder = sys.argv[2]
BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                     vocab_size=32)).save_pretrained(folder)
BertModel.from_pretrained(folder, local_files_only=True)
"""


@pytest.mark.parametrize("when", ["quiet", "plain"])
def test_a_local_text_encoder_loads_without_a_bar(tmp_path: Path, when: str) -> None:
    """transformers draws a "Loading weights" bar per model it loads; the training console has none (transformers
    is imported first here, as a family's text encoder imports it before the console is installed)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}  # an earlier install's
    proc = subprocess.run([sys.executable, "-c", LOAD_A_TEXT_ENCODER, when, str(tmp_path / "bert")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("Loading weights" in proc.stderr) == (when == "plain"), proc.stderr[-2000:]
