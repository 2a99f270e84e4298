"""Online REINFORCE (``train_impl: reinforce``): sample completions of training prompts from the current policy,
score them, and follow the policy gradient with a baseline and a KL penalty to the reference.

For each completion y of prompt x with reward R: kl = log pi(y|x) - log pi_ref(y|x) (the sequence-level
estimate, without gradient), R' = R - kl_div_beta * kl, advantage A = R' - b with b the mean R' of the
micro-batch (or, with ``reinforce_leave_one_out``, the mean of the others'), and the loss is
-mean(A * log pi(y|x)). The reference is a frozen copy of the starting weights, kept in the run directory
(``reference_model.pt``, whole weights whatever the layout) so that a resumed run penalises against the same one.

Layouts: one process, DDP and ZeRO (FSDP2) and tensor parallelism. Every rank samples its own prompts with the
policy as it is laid out (FSDP2 gathers each block's weights in its forward; neox.infer.generate keeps the
sharded ranks stepping together and the tensor-parallel ranks on the same tokens). The reference is a plain GPT
with the policy's starting weights, sharded over the tensor-parallel ranks as the policy is and whole on each
data-parallel rank (it needs no gradients or optimizer state; under ZeRO it costs one full copy of the weights
per rank).

Sampling and scoring come from the caller, as functions (the train layer sits below neox.infer):
``sampler(model, prompts, max_new_tokens, temperature) -> completions`` (token lists; a completion that
ended at EOD ends with it) and ``reward_fn(prompts, completions) -> rewards`` (floats), on token ids.
``neox train`` builds the sampler on neox.infer.generate and the reward from ``reinforce_reward_model``.
The samples of a micro-batch are drawn when the loop asks for it, just before its step, so they always come
from the policy that step updates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from neox.data.loader import collate, micro_batch_indices
from neox.data.preference import PromptDataset, build_prompt_datasets
from neox.errors import ConfigError
from neox.model import GPT
from neox.model.lora import is_adapter_key
from neox.parallel import is_vocab_parallel, loss_context
from neox.parallel.tensor import apply_tensor_parallel
from neox.train.preference import sequence_logps

REFERENCE_MODEL_FILE = "reference_model.pt"
Sampler = Callable[[torch.nn.Module, list, int, float], list]
RewardFn = Callable[[list, list], list]


def reinforce_loss(
    logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, kl_beta: float, leave_one_out: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, kl per sequence) of the module docstring's estimator."""
    kl = logps.detach() - ref_logps
    shaped = rewards - kl_beta * kl
    n = shaped.numel()
    if leave_one_out and n > 1:
        baseline = (shaped.sum() - shaped) / (n - 1)
    else:
        baseline = shaped.mean()
    advantage = shaped - baseline
    return -(advantage * logps).mean(), kl


class ReinforceObjective:
    batch_keys = ("ref_logps", "reward")

    def __init__(self, train_cfg, sampler: Sampler | None, reward_fn: RewardFn | None):
        if sampler is None or reward_fn is None:
            raise ConfigError(
                "train_impl reinforce samples with the policy and scores with a reward: the Trainer needs sampler= "
                "and reward_fn= (neox train builds them; set train.reinforce_reward_model)"
            )
        self.cfg = train_cfg
        self.impl = "reinforce"
        self.sampler, self.reward_fn = sampler, reward_fn
        self.policy = self.reference_model = None
        self._stats: list[torch.Tensor] = []

    def datasets(self, data_cfg, seq_length: int, seed: int) -> tuple:
        self.seq_length = seq_length
        self.splits = build_prompt_datasets(data_cfg, seed)
        return self.splits

    # ---- reference: a frozen copy of the starting weights
    def compute_reference(self, model, precision, device, eod_id: int, micro: int, runner=None) -> None:
        # `runner` is unused: the reference is a frozen copy of the whole model (pipeline stages are refused)
        self.policy, self.precision, self.device, self.eod_id = model, precision, device, eod_id
        self._start_state = None  # the whole starting weights, on the rank that keeps them (save_reference)
        if not dist.is_initialized():
            self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
            return
        # every rank takes part and gets the whole weights (full tensors, also of tensor-parallel DTensors)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
        if any(is_adapter_key(k) for k in state):
            raise ConfigError("train_impl reinforce with LoRA adapters runs in one process for now; drop lora.rank")
        self._start_state = {k: v.cpu().clone() for k, v in state.items()} if dist.get_rank() == 0 else None
        self.reference_model = reference_model_like(model, device)
        self._load_whole(state)

    def _load_whole(self, state: dict) -> None:
        """The whole weights `state` (every rank's the same) into this rank's reference: its tensor-parallel
        slices where it is sharded (`state`'s entries are replaced by them)."""
        set_model_state_dict(self.reference_model, state, options=StateDictOptions(full_state_dict=True))

    def save_reference(self, run_dir: Path) -> None:
        state = self._start_state if self._start_state is not None else self.reference_model.state_dict()
        self._start_state = None
        torch.save(state, Path(run_dir) / REFERENCE_MODEL_FILE)

    def load_reference(self, run_dir: Path, model, precision, device, eod_id: int) -> bool:
        path = Path(run_dir) / REFERENCE_MODEL_FILE
        if not path.is_file():
            return False
        self.compute_reference(model, precision, device, eod_id, 0)
        self._start_state = None
        state = torch.load(path, weights_only=True, map_location=device)
        if dist.is_initialized():
            self._load_whole(state)
        else:
            self.reference_model.load_state_dict(state)
        return True

    # ---- online batches
    def batches(self, dataset: PromptDataset, micro: int, dp_rank: int, dp_size: int, start: int, *, eod_id, loop):
        for idx in micro_batch_indices(len(dataset), micro, dp_rank, dp_size, start, loop):
            yield self.sample_batch(dataset.prompts(idx))

    @torch.no_grad()
    def sample_batch(self, prompts: list[list[int]]) -> dict:
        c = self.cfg
        n = self.seq_length + 1
        keep = max(1, n - c.reinforce_max_new_tokens)
        prompts = [p[-keep:] for p in prompts for _ in range(c.reinforce_samples_per_prompt)]
        was_training = self.policy.training
        self.policy.eval()
        try:
            completions = self.sampler(self.policy, prompts, c.reinforce_max_new_tokens, c.reinforce_temperature)
        finally:
            self.policy.train(was_training)
        rewards = torch.tensor([float(r) for r in self.reward_fn(prompts, completions)], dtype=torch.float32)
        items = []
        for p, y in zip(prompts, completions):
            text, label = np.full(n, -1, dtype=np.int64), np.full(n, -100, dtype=np.int64)
            seq = (list(p) + list(y))[:n]
            text[: len(seq)] = seq
            label[len(p) : len(seq)] = seq[len(p) :]
            items.append({"text": text, "label": label})
        batch = collate(items, eod_id=self.eod_id)
        with self.precision.autocast():
            logits = self.reference_model(batch["tokens"].to(self.device))
        with loss_context(is_vocab_parallel(logits)):
            ref = sequence_logps(logits, batch["labels"].to(self.device), batch["loss_mask"].to(self.device))
        batch["ref_logps"] = ref.cpu()
        batch["reward"] = rewards
        return batch

    def __call__(self, logits, labels, loss_mask, ref_logps=None, reward=None) -> torch.Tensor:
        logps = sequence_logps(logits, labels, loss_mask)
        rewards = reward.to(logps.device)
        loss, kl = reinforce_loss(
            logps, ref_logps.to(logps.device), rewards, self.cfg.kl_div_beta, self.cfg.reinforce_leave_one_out
        )
        if torch.is_grad_enabled():
            self._stats.append(torch.stack([rewards.mean(), kl.mean()]))
        return loss

    def read_stats(self) -> dict:
        if not self._stats:
            return {}
        mean_reward, kl = torch.stack(self._stats).mean(0).tolist()
        self._stats.clear()
        return {"mean_reward": mean_reward, "kl_to_reference": kl}


def reference_model_like(policy, device: torch.device) -> torch.nn.Module:
    """A frozen plain GPT shaped as `policy` (of its config), sharded over the policy's tensor-parallel ranks as it
    is and whole otherwise (data-parallel wrapping is for training), its weights still to be loaded."""
    with torch.device("meta"):
        ref = GPT(policy.cfg)
    tp = tp_mesh_of(policy)
    if tp is not None:
        apply_tensor_parallel(ref, tp, sequence_parallel=False)
    ref.to_empty(device=device)
    dtypes = {p.dtype for p in policy.parameters()}
    if len(dtypes) == 1:  # a policy kept in one dtype (bf16 weights): its reference too
        ref.to(dtypes.pop())
    for name, buf in policy.named_buffers():  # rotary and position tables (computed, not all in a state dict)
        owner, _, leaf = name.rpartition(".")
        local = buf.to_local() if isinstance(buf, DTensor) else buf
        setattr(ref.get_submodule(owner), leaf, local.detach().clone())  # the policy's values and dtype
    return ref.requires_grad_(False).eval()


def tp_mesh_of(policy):
    """The 1-D tensor-parallel mesh `policy`'s attention weights are sharded over, or None."""
    w = next(iter(policy.layers.values())).attention.query_key_value.weight
    if not isinstance(w, DTensor) or "tp" not in (w.device_mesh.mesh_dim_names or ()):
        return None
    return w.device_mesh["tp"] if w.device_mesh.ndim > 1 else w.device_mesh
