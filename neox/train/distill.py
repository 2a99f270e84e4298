"""Knowledge distillation (``train_impl: distill``): the student learns from a frozen teacher's softened
next-token distribution as well as from the data.

Per micro-batch, over the tokens the LM loss counts (loss_mask and labels >= 0), with weights w_t summing to 1:

    loss = alpha * T^2 * sum_t w_t KL(p_t || q_t) + (1 - alpha) * sum_t w_t CE(labels_t, softmax(z_t))
    p_t = softmax(teacher_logits_t / T),  q_t = softmax(student_logits_t / T)

(Hinton et al., 2015: the T^2 factor keeps the soft term's gradient scale independent of T.) With
``distill_topk: k`` the teacher keeps only its k most likely tokens, renormalised, and the KL is taken over
those (sum over the k tokens of p log(p / q), q the student's full softmax at T gathered there): the same
loss a cache of the teacher's top-k logits gives.

The teacher is a neox checkpoint (any size; the same tokenizer, so the same padded vocabulary), loaded
whole on every rank in inference mode (eval, no gradients, frozen): it runs beside the student under one
process and data parallelism (DDP or ZeRO, each rank scoring its own micro-batches). Tensor and pipeline
parallelism are refused at config load. The runner hands the loss the micro-batch's tokens (``batch_keys``),
and the loss runs the teacher on them.

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

from neox.config import from_dict
from neox.errors import ConfigError, NeoxError
from neox.model import GPT
from neox.model.lora import apply_lora, is_adapter_key, merge_lora_
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
    its top-k as a (values, indices) pair instead), fp32 arithmetic."""
    v = student.shape[-1]
    z = student.reshape(-1, v).float()
    t = None if isinstance(teacher, tuple) else teacher.reshape(-1, v).float()
    flat_labels = labels.reshape(-1)
    keep = loss_mask.reshape(-1).float() * (flat_labels >= 0)
    w = keep / keep.sum().clamp(min=1.0)
    log_q = F.log_softmax(z / temperature, dim=-1)
    if isinstance(teacher, tuple):  # the teacher's top-k (values, indices) [B, S, k], from the cache
        values, index = (x.reshape(-1, x.shape[-1]) for x in teacher)
        log_p = F.log_softmax(values.float() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q.gather(1, index.long()))).sum(-1)
    elif topk:
        values, index = t.topk(topk, dim=-1)
        log_p = F.log_softmax(values / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q.gather(1, index))).sum(-1)
    else:
        log_p = F.log_softmax(t / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = -F.log_softmax(z, dim=-1).gather(1, flat_labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    soft, hard = (kl * w).sum(), (ce * w).sum()
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard, soft.detach(), hard.detach()


def load_teacher(path: str, student_vocab: int, device: torch.device) -> nn.Module:
    """The teacher checkpoint's GPT (a LoRA run's adapters merged), frozen, in eval mode on `device`."""
    where = resolve(path)
    cfg = from_dict(saved_config(where), source=str(where / "config.yml"))
    if cfg.model.vocab_size != student_vocab:
        raise ConfigError(
            f"train.distill_teacher: {where} has a vocabulary of {cfg.model.vocab_size} (padded), the student "
            f"{student_vocab}; distillation needs the same tokenizer and make_vocab_size_divisible_by"
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

    def __init__(self, cfg, device: torch.device, precision):
        self.cfg = cfg.train
        self.cache = (
            TeacherCache.read(cfg.train.distill_cache, cfg.train.distill_topk) if cfg.train.distill_cache else None
        )
        # with a cache the teacher is never run, so it is not loaded either
        self.teacher = None if self.cache else load_teacher(cfg.train.distill_teacher, cfg.model.vocab_size, device)
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
            v, i = logits.float().topk(topk, dim=-1)
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
