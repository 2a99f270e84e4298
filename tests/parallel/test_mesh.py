"""Layout validation: every impossible layout is a one-line ConfigError raised before any process group exists."""

from __future__ import annotations

import pytest

from neox.config.schema import ModelConfig, ParallelConfig
from neox.errors import ConfigError
from neox.parallel.mesh import ParallelDims, init_distributed


def dims(world, **kw):
    model = {k: kw.pop(k) for k in list(kw) if k in ModelConfig.__dataclass_fields__}
    return ParallelDims.from_config(ParallelConfig(**kw), world, ModelConfig(**model) if model else None)


def test_zero0_is_all_replication():
    d = dims(8, model_parallel_size=2, pipe_parallel_size=2)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp, d.dp) == (2, 2, 1, 2, 2)
    assert not d.fsdp and "DDP" in d.describe()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_shard_data_parallel(stage):
    d = dims(8, zero_stage=stage, model_parallel_size=2)
    assert (d.dp_replicate, d.dp_shard, d.tp) == (1, 4, 2) and d.fsdp


def test_hsdp_splits_replicate_and_shard():
    d = dims(8, zero_stage=3, dp_replicate=2)
    assert d.shape == (1, 2, 4, 1) and "HSDP" in d.describe()


def test_sequence_parallel_needs_tp():
    assert not dims(2, sequence_parallel=True).sp
    assert dims(2, sequence_parallel=True, model_parallel_size=2).sp


BAD = [
    (dict(world=6, model_parallel_size=4), "not divisible by pipe_parallel_size"),
    (dict(world=4, model_parallel_size=3), "not divisible by pipe_parallel_size"),
    (dict(world=8, zero_stage=1, dp_replicate=3), "not divisible by parallel.dp_replicate=3"),
    (dict(world=4, dp_replicate=2), "needs zero_stage 1, 2 or 3"),
    (dict(world=2, cpu_offload=True), "cpu_offload needs zero_stage"),
    (dict(world=4, model_parallel_size=4, num_attention_heads=6, hidden_size=48), "num_attention_heads=6"),
    (dict(world=4, model_parallel_size=4, num_attention_heads=8, num_kv_heads=2), "num_kv_heads=2"),
    (dict(world=2, model_parallel_size=2, vocab_size=101), "vocab_size=101"),
    (dict(world=2, model_parallel_size=2, intermediate_size=99), "intermediate_size=99"),
    (dict(world=2, model_parallel_size=2, sequence_parallel=True, seq_length=33), "seq_length=33"),
    (dict(world=4, pipe_parallel_size=4, num_layers=2), "num_layers=2 is fewer than the 4 pipeline"),
    (dict(world=4, pipe_parallel_size=2, pipe_stages_per_rank=2, num_layers=3), "fewer than the 4 pipeline"),
    (dict(world=2, model_parallel_size=0), "model_parallel_size must be a positive integer"),
    (dict(world=2, zero_stage=4), "zero_stage must be 0, 1, 2 or 3"),
    (dict(world=2, backend="mpi"), "parallel.backend"),
    (dict(world=1, num_attention_heads=6, num_kv_heads=4, hidden_size=48), "not divisible by num_kv_heads=4"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[m for _, m in BAD])
def test_bad_layouts_are_one_line_errors(kw, msg):
    kw = dict(kw)
    with pytest.raises(ConfigError) as e:
        dims(kw.pop("world"), **kw)
    text = str(e.value)
    assert msg in text and "\n" not in text


def test_bad_layout_fails_before_any_process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="world size 3"):
        init_distributed(ParallelConfig(model_parallel_size=2))
    assert not dist.is_initialized()


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d, mesh = init_distributed(ParallelConfig())
    assert d.world_size == 1 and mesh is None


def test_neox_info_nproc_uses_and_checks_the_layout(tmp_path, capsys):
    import json

    from neox.cli import main

    cfg = tmp_path / "tiny.yml"
    cfg.write_text(
        "hidden_size: 64\nnum_attention_heads: 4\nnum_layers: 4\nvocab_size: 512\n"
        "model_parallel_size: 2\nzero_optimization: {stage: 3}\n"
    )
    assert main(["info", str(cfg), "--json", "--nproc", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    setup = report["memory_setup"]
    assert (setup["dp"], setup["tp"], setup["zero_stage"]) == (4, 2, 3)
    assert main(["info", str(cfg), "--nproc", "5"]) == 2
    assert "world size 5 is not divisible" in capsys.readouterr().err
