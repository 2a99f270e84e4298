"""GPT-NeoX's configs/125M-dmoe.yml (with its configs/local_setup.yml) loads, and a shrunk copy trains.

The two files are written here key for key (values as upstream has them, its Python-style True included);
only the local_setup paths point at a tiny corpus and the shared GPT-2 tokenizer files.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from neox.config import load
from neox.config.schema import TokenizerConfig
from neox.data.preprocess import PreprocessOptions, preprocess
from neox.model import info
from neox.train.trainer import Trainer

from .tiny_run import WORDS

DMOE_125M = """\
# GPT-2 pretraining setup
{
   "pipe_parallel_size": 2,
   "model_parallel_size": 2,
   "num_layers": 12,
   "hidden_size": 1024,
   "num_attention_heads": 16,
   "seq_length": 2048,
   "max_position_embeddings": 2048,
   "norm": "layernorm",
   "pos_emb": "rotary",
   "no_weight_tying": true,
   "moe_num_experts": 8,
   "scaled_upper_triang_masked_softmax_fusion": false,
   "bias_gelu_fusion": false,
   "rope_fusion": false,
   "layernorm_fusion": false,
   "optimizer": {
     "type": "Adam",
     "params": {
       "lr": 0.0006,
       "betas": [0.9, 0.999],
       "eps": 1.0e-8,
     }
   },
   "zero_optimization": {
    "stage": 0,
    "allgather_partitions": True,
    "allgather_bucket_size": 500000000,
    "overlap_comm": True,
    "reduce_scatter": True,
    "reduce_bucket_size": 500000000,
    "contiguous_gradients": True,
  },
   "train_micro_batch_size_per_gpu": 4,
   "data_impl": "mmap",
   "split": "949,50,1",
   "checkpoint_activations": true,
   "checkpoint_num_layers": 1,
   "partition_activations": true,
   "synchronize_each_layer": true,
   "gradient_clipping": 1.0,
   "weight_decay": 0.0,
   "hidden_dropout": 0.0,
   "attention_dropout": 0.0,
   "precision": "bfloat16",
   "fp32_allreduce": True,
   "train_iters": 5,
   "lr_decay_iters": 320000,
   "distributed_backend": "nccl",
   "min_lr": 0.0006,
   "warmup": 0.0,
   "checkpoint_factor": 10000,
   "eval_interval": 1000,
   "eval_iters": 10,
   "log_interval": 1,
   "steps_per_print": 1,
   "keep_last_n_checkpoints": 4,
   "wall_clock_breakdown": true,
}
"""

# one process, two small MoE blocks, 20 steps: what a CPU test can afford of the same recipe
SHRINK = {
    "pipe_parallel_size": 1,
    "model_parallel_size": 1,
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "seq_length": 64,
    "max_position_embeddings": 64,
    "precision": "fp32",
    "train_micro_batch_size_per_gpu": 2,
    "train_iters": 20,
    "lr_decay_iters": 20,
    "eval_iters": 1,
    "tensorboard_dir": None,
    # GPT-NeoX's default tokenizer_type (GPT2BPETokenizer) is not neox's (ByteLevelTokenizer): name it
    "tokenizer_type": "GPT2BPETokenizer",
}


@pytest.fixture(scope="module")
def gpt2_corpus(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("dmoe")
    rng = random.Random(0)
    src = d / "corpus.jsonl"
    with open(src, "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "."}) + "\n")
    tok = shared_data / "tokenizers"
    tcfg = TokenizerConfig(
        tokenizer_type="GPT2BPETokenizer",
        vocab_file=str(tok / "gpt2-vocab.json"),
        merge_file=str(tok / "gpt2-merges.txt"),
    )
    preprocess(
        PreprocessOptions(inputs=[str(src)], output_prefix=str(d / "enron"), append_eod=True, progress=False), tcfg
    )
    return d, tok


def write_configs(d, tok, run_dir, extra: dict | None = None) -> list[str]:
    (d / "125M-dmoe.yml").write_text(DMOE_125M)
    local = {
        "data-path": str(d / "enron_text_document"),
        "vocab-file": str(tok / "gpt2-vocab.json"),
        "merge-file": str(tok / "gpt2-merges.txt"),
        "save": str(run_dir),
        "load": str(run_dir),
        "tensorboard-dir": str(run_dir / "tensorboard"),
        "log-dir": str(run_dir / "logs"),
    }
    (d / "local_setup.yml").write_text(yaml.safe_dump(local))
    paths = [str(d / "125M-dmoe.yml"), str(d / "local_setup.yml")]
    if extra is not None:
        (d / "shrink.yml").write_text(yaml.safe_dump(extra))
        paths.append(str(d / "shrink.yml"))
    return paths


def test_upstream_125m_dmoe_loads(gpt2_corpus, tmp_path):
    d, tok = gpt2_corpus
    cfg = load(write_configs(d, tok, tmp_path / "run"), training=True)
    m = cfg.model
    assert (m.moe_num_experts, m.moe_top_k, m.moe_router_type, m.moe_expert_interval) == (8, 1, "sinkhorn", 1)
    assert not m.moe_token_dropping and m.moe_aux_loss_coeff == 0.0  # GPT-NeoX's dropless MoE: no aux loss
    assert (cfg.parallel.pipe_parallel_size, cfg.parallel.model_parallel_size) == (2, 2)
    assert cfg.precision.precision == "bf16" and cfg.train.checkpoint_activations
    m.vocab_size = 50304
    # 12 MoE blocks of 8 experts; a token runs through one expert per block
    assert info.num_params(m) - info.num_active_params(m) == 12 * 7 * 2 * 1024 * 4096


def test_shrunk_125m_dmoe_trains_20_steps(gpt2_corpus, tmp_path):
    d, tok = gpt2_corpus
    torch.set_num_threads(1)
    cfg = load(write_configs(d, tok, tmp_path / "run", SHRINK), training=True)
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    losses = trainer.losses
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    records = [json.loads(x) for x in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "moe/tokens_per_expert" in r]
    assert len(train) == 20  # log_interval 1: every step
    # each step routes 2 x 64 tokens top-1 in 2 MoE blocks; recomputation (checkpoint_activations) is not counted
    assert all(sum(r["moe/tokens_per_expert"]) == 2 * 2 * 64 for r in train)
    assert all(r["moe/dropped_frac"] == 0.0 for r in train)
