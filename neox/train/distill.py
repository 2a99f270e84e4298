"""Knowledge distillation (``train_impl: distill``): the student learns from a frozen teacher's softened
next-token distribution as well as from the data.

Per micro-batch, over the tokens the LM loss counts (loss_mask and labels >= 0), with weights w_t summing to 1:

    loss = alpha * T^2 * sum_t w_t KL(p_t || q_t) + (1 - alpha) * sum_t w_t CE(labels_t, softmax(z_t))
    p_t = softmax(teacher_logits_t / T),  q_t = softmax(student_logits_t / T)

(Hinton et al., 2015: the T^2 factor keeps the soft term's gradient scale independent of T.) With
``distill_topk: k`` the teacher keeps only its k most likely tokens, renormalised, and the KL is taken over
those (sum over the k tokens of p log(p / q), q the student's full softmax at T gathered there): the same
loss a cache of the teacher's top-k logits gives.

The teacher is a neox checkpoint (any size; the same tokenizer, so the same padded vocabulary), loaded in
inference mode (eval, no gradients, frozen): whole on every rank under one process and data parallelism (DDP or
ZeRO, each rank scoring its own micro-batches); under tensor parallelism it is sharded over the tensor-parallel
ranks by the student's plan, so its logits come out vocab-sharded like the student's and the loss never
gathers a vocabulary: the softmaxes reduce over the shards (loss_parallel), the KL's sum over the vocabulary is
one all-reduce of a number per token, and a top-k is each shard's top-k, gathered (k per rank per token) and cut
to the k largest. Under pipeline parallelism the teacher is not split into stages: the loss runs on the last
stage, whose ranks hold the whole teacher (tensor-sharded as above under tp) and run it on the micro-batch's
tokens there. The runner hands the loss the micro-batch's tokens (``batch_keys``), and the loss runs the teacher
on them.

For repeated runs, ``neox distill --precompute FILE`` runs the teacher once over every training sample of the
run and saves its top-k logits (`TeacherCache`, keyed by each sample's tokens, so any data-parallel layout
finds its rows); ``train.distill_cache: FILE`` then trains without loading the teacher at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from neox.config import from_dict
from neox.errors import ConfigError, NeoxError
from neox.model import GPT
from neox.model.lora import apply_lora, is_adapter_key, merge_lora_
from neox.parallel.reduce import pick_from_vocab, shard_log_softmax, sum_over_shards, vocab_shard
from neox.parallel.tensor import apply_tensor_parallel
from neox.train.checkpoint import load_model_weights, resolve, saved_config
from neox.train.loss import masked_mean_loss


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    alpha: float,
    temperature: float,
    topk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, soft term KL, hard term CE) of the module docstring; logits [B, S, V] (the teacher's may be
    its top-k as a (values, indices) pair instead), fp32 arithmetic. Vocab-sharded logits (DTensors, tensor
    parallelism: student and live teacher alike, sharded the same) are worked on shard by shard: each rank's
    block of the vocabulary, with the sums over it taken across the ranks."""
    z, start, like = _block(student)
    z = z.reshape(-1, z.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    keep = loss_mask.reshape(-1).float() * (flat_labels >= 0)
    w = keep / keep.sum().clamp(min=1.0)
    log_q = _log_softmax(z / temperature, like)
    if isinstance(teacher, tuple):  # the teacher's top-k (values, indices) [B, S, k], from the cache
        values, index = (x.reshape(-1, x.shape[-1]) for x in teacher)
        log_p = F.log_softmax(values.float() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - pick_from_vocab(log_q, start, like, index.long()))).sum(-1)
    elif topk:
        values, index = vocab_topk(teacher.reshape(-1, teacher.shape[-1]), topk)
        log_p = F.log_softmax(values.float() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - pick_from_vocab(log_q, start, like, index))).sum(-1)
    else:
        t = _block(teacher)[0]
        log_p = _log_softmax(t.reshape(-1, t.shape[-1]).float() / temperature, like)
        kl = _vocab_sum(log_p.exp() * (log_p - log_q), like)
    ce = -pick_from_vocab(_log_softmax(z, like), start, like, flat_labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    soft, hard = (kl * w).sum(), (ce * w).sum()
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard, soft.detach(), hard.detach()


def _block(logits: torch.Tensor) -> tuple[torch.Tensor, int, DTensor | None]:
    """(the vocabulary block this rank holds, its first global index, the sharded logits or None): plain
    logits are one block from 0."""
    if not isinstance(logits, DTensor):
        return logits, 0, None
    local, start, _ = vocab_shard(logits)
    return local, start, logits


def _log_softmax(block: torch.Tensor, like) -> torch.Tensor:
    return F.log_softmax(block, dim=-1) if like is None else shard_log_softmax(block, like)


def _vocab_sum(block: torch.Tensor, like) -> torch.Tensor:
    """[N] sums over the vocabulary of [N, V] (sharded: each rank's block summed, then the N sums across ranks)."""
    total = block.sum(-1)
    return total if like is None else sum_over_shards(total, like)


def vocab_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, global indices) [N, k] of each row's k largest logits [N, V], largest first, without gradient
    (the teacher's). Sharded: each rank's own top-k (as global indices), all-gathered (k per rank per row),
    then the k largest of those: the global top-k, without gathering the vocabulary."""
    if not isinstance(logits, DTensor):
        return logits.detach().topk(k, dim=-1)
    local, start, width = vocab_shard(logits)
    values, index = local.detach().topk(min(k, width), dim=-1)
    mesh = logits.device_mesh
    values = DTensor.from_local(values, mesh, [Shard(1)], run_check=False).full_tensor()
    index = DTensor.from_local(index + start, mesh, [Shard(1)], run_check=False).full_tensor()
    values, order = values.topk(k, dim=-1)
    return values, index.gather(1, order)


def load_teacher(path: str, student_vocab: int, device: torch.device, tp: int = 1) -> nn.Module:
    """The teacher checkpoint's GPT (a LoRA run's adapters merged), frozen, in eval mode on `device`; `tp`: the
    tensor-parallel size it will be sharded over (its heads must divide by it)."""
    where = resolve(path)
    cfg = from_dict(saved_config(where), source=str(where / "config.yml"))
    if cfg.model.vocab_size != student_vocab:
        raise ConfigError(
            f"train.distill_teacher: {where} has a vocabulary of {cfg.model.vocab_size} (padded), the student "
            f"{student_vocab}; distillation needs the same tokenizer and make_vocab_size_divisible_by"
        )
    for name in ("num_attention_heads", "num_kv_heads"):
        if getattr(cfg.model, name) % tp:
            raise ConfigError(
                f"train.distill_teacher: {where} has {name} {getattr(cfg.model, name)}, which tensor-parallel "
                f"size {tp} (parallel.model_parallel_size) does not divide; the teacher is sharded as the student"
            )
    model = GPT(cfg.model)
    lo = cfg.lora
    if lo.rank:
        apply_lora(model, lo.rank, lo.alpha, lo.dropout, lo.target_modules)
    load_model_weights(where, model, optional=is_adapter_key if lo.rank else None)
    merge_lora_(model)
    model.requires_grad_(False)
    return model.to(device).eval()


class Distiller:
    """The runner's loss function for train_impl distill: runs the teacher on the micro-batch's tokens.

    Evaluation (no gradients) scores the student's plain LM cross entropy without the teacher, so validation
    losses compare with runs trained without one."""

    batch_keys = ("tokens", "position_ids", "segment_ids")

    def __init__(self, cfg, device: torch.device, precision, mesh=None):
        self.cfg = cfg.train
        self.cache = (
            TeacherCache.read(cfg.train.distill_cache, cfg.train.distill_topk) if cfg.train.distill_cache else None
        )
        tp = mesh["tp"] if mesh is not None and mesh["tp"].size() > 1 else None
        # with a cache the teacher is never run, so it is not loaded either
        self.teacher = None
        if self.cache is None:
            self.teacher = load_teacher(
                cfg.train.distill_teacher, cfg.model.vocab_size, device, tp.size() if tp is not None else 1
            )
            if tp is not None:  # the student's layout: logits vocab-sharded like the student's
                apply_tensor_parallel(self.teacher, tp, cfg.parallel.sequence_parallel)
            if mesh is not None and mesh["pp"].get_local_rank() != mesh["pp"].size() - 1:
                # pipeline stages: the loss runs on the last stage only. Every rank loaded the teacher (the
                # checkpoint load is collective over all ranks); the others let it go
                self.teacher = None
        self.precision = precision
        self.device = device
        # the teacher sees the positions and document masks the student sees
        self.pass_positions, self.pass_segments = cfg.data.reset_position_ids, cfg.data.reset_attention_mask
        self._stats: list[torch.Tensor] = []

    def __call__(self, logits, labels, loss_mask, tokens=None, position_ids=None, segment_ids=None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return masked_mean_loss(logits, labels, loss_mask)
        if self.cache is not None:
            teacher = self.cache.lookup(tokens)
        else:
            teacher = self.teacher_logits(tokens, position_ids, segment_ids)
        c = self.cfg
        loss, soft, hard = distillation_loss(
            logits, teacher, labels, loss_mask, c.distill_alpha, c.distill_temperature, c.distill_topk
        )
        self._stats.append(torch.stack([soft, hard]))
        return loss

    @torch.no_grad()
    def teacher_logits(self, tokens, position_ids=None, segment_ids=None) -> torch.Tensor:
        with self.precision.autocast():
            return self.teacher(
                tokens,
                position_ids=position_ids if self.pass_positions else None,
                segment_ids=segment_ids if self.pass_segments else None,
            )

    def read_stats(self) -> dict:
        """Means since the last read of this rank's micro-batches: the KL term and the LM cross entropy."""
        if not self._stats:
            return {}
        kl, ce = torch.stack(self._stats).mean(0).tolist()
        self._stats.clear()
        return {"distill_kl": kl, "lm_loss": ce}


def row_keys(tokens: torch.Tensor) -> list[bytes]:
    """A 16-byte digest per token row: the cache's key (the rows, not their order or the layout, identify them)."""
    rows = tokens.detach().to("cpu", torch.int64).contiguous().numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]


class TeacherCache:
    """The teacher's top-k logits for every training sample, on disk (``train.distill_cache``): written once by
    ``neox distill --precompute``, read by runs that then never load the teacher. One file (torch.save):
    {"topk": k, "keys": uint8 [N, 16], "values": fp32 [N, S, k], "indices": int32 [N, S, k]}: the loss from it is
    the loss of the live teacher with the same distill_topk."""

    def __init__(self, topk: int, keys: list[bytes], values: torch.Tensor, indices: torch.Tensor, path: str = ""):
        self.topk, self.values, self.indices, self.path = topk, values, indices, path
        self.rows = {k: i for i, k in enumerate(keys)}

    @classmethod
    def read(cls, path: str, topk: int) -> TeacherCache:
        try:
            d = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise NeoxError(
                f"train.distill_cache: cannot read {path} ({type(e).__name__}); write it with neox distill --precompute"
            ) from None
        if d["topk"] != topk:
            raise ConfigError(
                f"train.distill_cache: {path} holds the teacher's top {d['topk']}, distill_topk is {topk}"
            )
        return cls(d["topk"], [bytes(r) for r in d["keys"].tolist()], d["values"], d["indices"], path)

    def lookup(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            rows = torch.tensor([self.rows[k] for k in row_keys(tokens)])
        except KeyError:
            raise NeoxError(
                f"train.distill_cache: {self.path} has no teacher logits for a training sample; precompute it again "
                "with this config's data, seq_length, seed and train_iters"
            ) from None
        device = tokens.device
        return self.values[rows].to(device), self.indices[rows].to(device)

    @staticmethod
    def write(path: str | Path, distiller: Distiller, batches, topk: int) -> int:
        """Run the teacher over `batches` (micro-batch dicts) and save its top-k; returns the rows written."""
        keys, values, indices, seen = [], [], [], set()
        for b in batches:
            extra = {k: b[k].to(distiller.device) for k in ("position_ids", "segment_ids") if k in b}
            logits = distiller.teacher_logits(b["tokens"].to(distiller.device), **extra)
            v, i = logits.float().topk(topk, dim=-1)  # one process (neox distill --precompute): plain logits
            for r, key in enumerate(row_keys(b["tokens"])):
                if key not in seen:
                    seen.add(key)
                    keys.append(list(key))
                    values.append(v[r].to("cpu", torch.float32))
                    indices.append(i[r].to("cpu", torch.int32))
        d = {
            "topk": topk,
            "keys": torch.tensor(keys, dtype=torch.uint8),
            "values": torch.stack(values),
            "indices": torch.stack(indices),
        }
        torch.save(d, Path(path))
        return len(keys)
