"""resume_config: elastic-restart resume and the checkpoint's padded vocabulary (no process group needed)."""

from __future__ import annotations

import pytest
import yaml

from neox.config.schema import Config
from neox.errors import ConfigError
from neox.train.distributed import resume_config


def fake_checkpoint(run, vocab):
    # what resume_config reads: the `latest` pointer, a complete DCP directory and its config.yml
    ckpt = run / "iter_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"")
    (ckpt / "config.yml").write_text(yaml.safe_dump({"model": {"vocab_size": vocab}}))
    (run / "latest").write_text("iter_0000004\n")


def test_resume_keeps_the_checkpoints_vocab(tmp_path):
    fake_checkpoint(tmp_path, 384)
    cfg = Config()
    cfg.checkpoint.load = str(tmp_path)
    cfg.parallel.model_parallel_size = 2
    out = resume_config(cfg)
    assert out.model.vocab_size == 384 and cfg.model.vocab_size is None  # a copy; the input is untouched
    cfg.model.vocab_size = 512  # set by the user: kept (a mismatch is the checkpoint loader's error)
    assert resume_config(cfg).model.vocab_size == 512
    cfg.model.vocab_size, cfg.parallel.model_parallel_size = None, 5
    with pytest.raises(ConfigError, match=r"\(384\) cannot be split over model_parallel_size=5"):
        resume_config(cfg)


def test_fresh_and_restarted_runs(tmp_path, monkeypatch):
    cfg = Config()
    cfg.checkpoint.save = str(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert resume_config(cfg) is cfg  # restarted before the first save: start fresh
    fake_checkpoint(tmp_path, 320)
    out = resume_config(cfg)
    assert out.checkpoint.load == str(tmp_path) and out.model.vocab_size == 320
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert resume_config(cfg) is cfg  # first attempt: a save directory alone does not mean resume
