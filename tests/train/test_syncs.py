"""Host syncs of the training loop, counted (tests/syncs.py): a step that does not log reads nothing from the
device; a log line reads its window's losses and norms once."""

import pytest
import torch

from neox.train.trainer import Trainer

from ..syncs import count_syncs
from .tiny_run import make_corpus, tiny_config

STEPS, LOG_EVERY = 7, 3  # log lines at 3, 6 and 7 (the last step always logs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), docs=100)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def traced(trainer: Trainer) -> tuple[list[list[str]], list[list[str]]]:
    """Per optimizer step and per log line, the host reads neox made in it."""
    steps, logs = [], []
    step, log = trainer._timed_step, trainer._log_record

    def timed(*args):
        with count_syncs(steps.append([]) or steps[-1]):
            return step(*args)

    def logged(*args):
        with count_syncs(logs.append([]) or logs[-1]):
            return log(*args)

    trainer._timed_step, trainer._log_record = timed, logged
    return steps, logs


@pytest.mark.parametrize("accum", [1, 2])
def test_only_log_lines_read_the_device(corpus, accum):
    cfg = tiny_config(
        corpus,
        train={"train_iters": STEPS, "gradient_accumulation_steps": accum, "gradient_clipping": 0.5},
        eval={"eval_iters": 0},
        logging={"log_interval": LOG_EVERY},
    )
    trainer = Trainer(cfg, quiet=True)
    steps, logs = traced(trainer)
    with count_syncs() as everything:
        trainer.fit()
    assert len(steps) == STEPS and len(logs) == 3
    assert steps == [[]] * STEPS  # no step reads its loss, its gradient norm or waits for the device
    assert [len(x) for x in logs] == [1, 1, 1], logs  # one read of the window's losses and norms
    assert len(everything) == 3, everything  # nothing else in the loop (metrics, console) reads a tensor
    assert len(trainer.losses) == STEPS


def test_fp16_reads_the_norm_once_a_step(corpus):
    """The loss scaler decides on the host whether a step overflowed: one read a step, documented."""
    cfg = tiny_config(
        corpus,
        train={"train_iters": 4},
        eval={"eval_iters": 0},
        logging={"log_interval": 4},
        precision={"precision": "fp16"},
    )
    trainer = Trainer(cfg, quiet=True)
    steps, logs = traced(trainer)
    trainer.fit()
    assert [len(x) for x in steps] == [1] * 4, steps
    assert [len(x) for x in logs] == [1]
