"""checkpoint.on_save_error: a save that hits a full disk stops the run with one line, or training continues."""

import errno
import os

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

from neox.train import checkpoint as ckpt
from neox.train.trainer import Trainer

from .tiny_run import make_corpus, tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def disk_full_after(monkeypatch, saves_that_work):
    """DCP's writer fails with ENOSPC from save number `saves_that_work + 1` on (files of one save share a call)."""
    real, seen = dcp_fs._write_item, set()

    def write(stream, data, write_item, storage_key, *a, **k):
        seen.add(os.path.dirname(getattr(stream, "name", "")) or id(stream))
        if len(seen) > saves_that_work:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(stream, data, write_item, storage_key, *a, **k)

    monkeypatch.setattr(dcp_fs, "_write_item", write)


def test_on_save_error_stop_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = tiny_config(corpus, tmp_path, eval={"eval_iters": 0}, checkpoint={"save_interval": 4})
    disk_full_after(monkeypatch, 1)
    with pytest.raises(ckpt.SaveError, match="could not save iter_0000008 .*No space left on device"):
        Trainer(cfg, quiet=True).fit()
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("iter_")] == ["iter_0000004"]
    assert ckpt.resolve(tmp_path, verify=True).name == "iter_0000004"


def test_on_save_error_continue_trains_on(corpus, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    cfg = tiny_config(
        corpus, tmp_path, eval={"eval_iters": 0}, checkpoint={"save_interval": 4, "on_save_error": "continue"}
    )
    disk_full_after(monkeypatch, 1)
    t = Trainer(cfg)
    t.fit()
    assert t.iteration == t.train_iters
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("iter_")] == ["iter_0000004"]
    out = capsys.readouterr().out
    assert "warning: checkpoint: could not save iter_0000008" in out and "training continues" in out
