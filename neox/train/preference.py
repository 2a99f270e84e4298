"""Preference objectives (GPT-NeoX's ``train_impl``): DPO (and IPO, conservative DPO) on chosen/rejected pairs,
KTO on unpaired desirable/undesirable completions, and reward models (rm) on pairs.

The loop does not change: the objective is the runner's loss function (``neox.parallel.runner.LossFn`` plus
the batch entries named in ``batch_keys``) and supplies the datasets and loaders (``neox.data.preference``).
Every loss works on sequence log-probabilities: the sum over a row's completion tokens (labels != -100) of
log pi(token), in fp32.

The reference policy is the weights the run starts from (after ``checkpoint.load`` with ``finetune``): their
log-probabilities for every document of every split are computed once, before the first step, and kept in
the run directory (``reference_logps.pt``) so a resumed run scores against the same reference. This costs one
forward pass over the data and no second model in memory.

A reward model's scalar head is the output layer's row of the end-of-document token, read at the last
completion token (the position whose target is the EOD that ends every preference completion): a linear
function of the final hidden state with no new parameters, so every layout, checkpoint and export of the
language model serves reward models unchanged, and the score starts from the LM's "this answer ends here"
logit. Pairs train it by the Bradley-Terry loss -log sigmoid(score(chosen) - score(rejected)).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from neox.data.loader import collate
from neox.data.preference import PreferenceDataset, build_preference_datasets, encode_completion, preference_batches
from neox.errors import ConfigError
from neox.parallel.reduce import pick_from_vocab, token_losses, vocab_shard

REFERENCE_FILE = "reference_logps.pt"
# what the log lines report, per objective (means over the training micro-batches since the last line)
STAT_NAMES = {
    "dpo": ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"),
    "kto": ("reward_margin", "reward_accuracy", "mean_reward", "kl_estimate"),
    "rm": ("score_margin", "pair_accuracy"),
}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B] sums of log-softmax(logits) at the labels over the kept positions (fp32). Vocab-sharded logits (a
    DTensor under tensor parallelism; call inside neox.parallel.loss_context) go through the parallel cross
    entropy, which reduces the softmax over the shards without gathering the vocabulary."""
    if isinstance(logits, DTensor):
        picked = -token_losses(logits.float(), labels.clamp(min=0))
    else:
        logp = F.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    keep = (loss_mask > 0) & (labels >= 0)
    return (picked * keep).sum(-1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    kind: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards, rejected rewards) over pairs of sequence log-probabilities.

    sigmoid (Rafailov et al.): -log sigmoid(beta * h), h = (chosen - ref_chosen) - (rejected - ref_rejected);
    with label smoothing e (conservative DPO) -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
    ipo (Azar et al.): (h - 1 / (2 beta))^2. Rewards are beta * (logp - ref_logp)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, rewards, KL estimate) of KTO (Ethayarajh et al.) over completions.

    reward r = log pi - log pi_ref; z0 = the batch's mean r clamped at 0, without gradient (the paper's
    estimate of KL(pi || pi_ref), here from the batch's own completions); loss = lambda_D (1 - sigmoid(beta (r -
    z0))) for desirable completions, lambda_U (1 - sigmoid(beta (z0 - r))) for undesirable ones."""
    r = logps - ref_logps
    z0 = r.detach().mean().clamp(min=0)
    good = 1.0 - torch.sigmoid(beta * (r - z0))
    bad = 1.0 - torch.sigmoid(beta * (z0 - r))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses.mean(), beta * r.detach(), z0


def reward_scores(logits: torch.Tensor, labels: torch.Tensor, token: int) -> torch.Tensor:
    """[B] the logit of `token` at each row's last position with a target (labels >= 0), in fp32."""
    t = labels.shape[1]
    positions = torch.arange(t, device=labels.device).expand_as(labels)
    last = torch.where(labels >= 0, positions, torch.full_like(positions, -1)).amax(dim=1).clamp(min=0)
    rows = torch.arange(labels.shape[0], device=labels.device)
    if isinstance(logits, DTensor):
        # the rank holding `token` reads it, the others give zeros; B numbers cross the ranks
        local, start, _ = vocab_shard(logits)
        index = torch.full((labels.shape[0], 1), token, device=labels.device)
        return pick_from_vocab(local[rows, last].float(), start, logits, index).squeeze(1)
    return logits[rows, last, token].float()


@torch.no_grad()
def score_completions(model, tokenizer, pieces: list, seq_length: int, device, batch_size: int = 8) -> list[float]:
    """Reward-model scores of (prompt, completion) pairs, encoded and cut as training reads them."""
    out: list[float] = []
    for start in range(0, len(pieces), batch_size):
        items = []
        for prompt, completion in pieces[start : start + batch_size]:
            tokens, labels = encode_completion(tokenizer, prompt, completion)
            n = seq_length + 1
            text, lab = torch.full((n,), -1, dtype=torch.int64), torch.full((n,), -100, dtype=torch.int64)
            text[: min(n, len(tokens))] = torch.from_numpy(tokens[:n])
            lab[: min(n, len(labels))] = torch.from_numpy(labels[:n].astype("int64"))
            items.append({"text": text.numpy(), "label": lab.numpy()})
        b = collate(items, eod_id=tokenizer.eod_id)
        logits = model(b["tokens"].to(device))
        out.extend(reward_scores(logits, b["labels"].to(device), tokenizer.eod_id).cpu().tolist())
    return out


def rm_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: mean of -log sigmoid(chosen - rejected) over pairs of scores."""
    return -F.logsigmoid(chosen - rejected).mean()


class PreferenceObjective:
    """The loss function, data and reference of one ``train_impl``; the trainer calls it as a runner loss."""

    batch_keys = ("ref_logps", "reward")

    def __init__(self, train_cfg):
        self.cfg = train_cfg
        self.impl = train_cfg.train_impl
        self.paired = self.impl in ("dpo", "rm")
        self.eod_id: int | None = None  # the reward model's score token, set with the loaders
        self.reference: dict[str, torch.Tensor] = {}  # split -> [documents, sides]
        self._stats: list[torch.Tensor] = []

    # ---- data
    def datasets(self, data_cfg, seq_length: int, seed: int) -> tuple:
        self.splits = build_preference_datasets(data_cfg, seq_length, seed, paired=self.paired)
        return self.splits

    def batches(self, dataset: PreferenceDataset, micro: int, dp_rank: int, dp_size: int, start: int, *, eod_id, loop):
        split = ("train", "valid", "test")[[id(d) for d in self.splits].index(id(dataset))]
        table = self.reference.get(split)
        self.eod_id = eod_id
        for batch in preference_batches(dataset, micro, dp_rank, dp_size, start, eod_id=eod_id, loop=loop):
            if table is not None:  # [b, sides] -> the batch's row order: all chosen rows, then all rejected
                batch["ref_logps"] = table[batch["pair_index"]].T.reshape(-1)
            yield batch

    # ---- reference
    @torch.no_grad()
    def compute_reference(self, model, precision, device, eod_id: int, micro: int, runner=None) -> None:
        """Log-probabilities of every document of every split under the current (initial) weights, by the run's
        step runner (`runner.eval_rows`: through the pipeline under pipeline stages; `model` is not used)."""
        self.eod_id = eod_id
        if self.impl == "rm" or (self.impl == "dpo" and self.cfg.dpo_reference_free):
            return
        for split, ds in zip(("train", "valid", "test"), self.splits):
            if ds is None:
                continue
            sides = len(ds.sides)
            table = torch.empty(len(ds), sides, dtype=torch.float32)
            for start in range(0, len(ds), micro):
                docs = list(range(start, min(start + micro, len(ds))))
                n = len(docs)
                # every batch `micro` documents (the last one's repeated): pipeline stages size their receive
                # buffers by their first batch
                items = ds.batch_documents(docs + docs[-1:] * (micro - n), eod_id)
                lp = runner.eval_rows(items, sequence_logps)
                table[start : start + n] = lp.reshape(sides, -1).T[:n]
            self.reference[split] = table

    def save_reference(self, run_dir: Path) -> None:
        torch.save(self.reference, Path(run_dir) / REFERENCE_FILE)

    def load_reference(self, run_dir: Path, model, precision, device, eod_id: int) -> bool:
        self.eod_id = eod_id
        path = Path(run_dir) / REFERENCE_FILE
        if not path.is_file():
            return False
        self.reference = torch.load(path, weights_only=True)
        return True

    # ---- the loss
    def __call__(self, logits, labels, loss_mask, ref_logps=None, reward=None) -> torch.Tensor:
        if self.impl == "rm":
            scores = reward_scores(logits, labels, self.eod_id)
            b = scores.shape[0] // 2
            loss = rm_loss(scores[:b], scores[b:])
            diff = (scores[:b] - scores[b:]).detach()
            if torch.is_grad_enabled():
                self._stats.append(torch.stack([diff.mean(), (diff > 0).float().mean()]))
            return loss
        logps = sequence_logps(logits, labels, loss_mask)
        if ref_logps is None:
            if not (self.impl == "dpo" and self.cfg.dpo_reference_free):
                raise ConfigError(f"train_impl {self.impl}: the batch has no reference log-probabilities")
            ref_logps = torch.zeros_like(logps)
        ref_logps = ref_logps.to(logps.device)
        c = self.cfg
        if self.paired:
            b = logps.shape[0] // 2
            loss, good, bad = dpo_loss(
                logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], c.dpo_beta, c.dpo_label_smoothing, c.dpo_loss
            )
            stats = torch.stack([(good - bad).mean(), (good > bad).float().mean(), good.mean(), bad.mean()])
        else:
            desirable = reward.to(logps.device) > 0
            loss, rewards, kl = kto_loss(
                logps, ref_logps, desirable, c.kto_beta, c.kto_desirable_weight, c.kto_undesirable_weight
            )
            signed = torch.where(desirable, rewards, -rewards)
            stats = torch.stack([signed.mean(), (signed > 0).float().mean(), rewards.mean(), kl])
        if torch.is_grad_enabled():  # training steps only, not evaluation
            self._stats.append(stats)
        return loss

    def read_stats(self) -> dict:
        """Means since the last read (this rank's micro-batches): one host read, at log lines."""
        if not self._stats:
            return {}
        values = torch.stack(self._stats).mean(0).tolist()
        self._stats.clear()
        return dict(zip(STAT_NAMES[self.impl], values))


def prepare_reference(
    objective, model, precision, device, eod_id: int, micro: int, run_dir, resumed: bool, write: bool, runner=None
):
    """The objective's reference from the starting weights, or on a resume the one the run started with (kept in
    the run directory; `write`: this rank keeps it). `runner` is the run's StepRunner, `model` what it trains."""
    if resumed and run_dir is not None and objective.load_reference(Path(run_dir), model, precision, device, eod_id):
        return
    if resumed:
        raise ConfigError(
            f"train_impl {objective.impl}: resuming needs the reference the run started with, kept in {run_dir}, "
            "which is missing there"
        )
    objective.compute_reference(model, precision, device, eod_id, micro, runner=runner)
    if run_dir is not None and write:
        objective.save_reference(Path(run_dir))
