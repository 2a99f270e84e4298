"""KVCache: preallocated keys/values per layer for incremental decoding.

Usage (left-padded batch of prompts):
    cache = KVCache.for_model(model, batch_size=B, max_len=prompt_len + new_tokens)
    cache.mark_padding(attention_mask)          # [B, prompt_len], 1 = token, 0 = left padding
    logits = model(prompt_ids, position_ids, kv_cache=cache)        # prefill
    logits = model(next_ids[:, None], next_pos[:, None], kv_cache=cache)   # decode, same code path
Each forward writes its keys/values at slots [length, length + T) and attends over [0, length + T).

StaticKVCache keeps every shape fixed from step to step (it attends over all max_len slots under a mask and
tracks its length in a tensor), so one compiled decode step serves the whole generation.
"""

from __future__ import annotations

import torch

from neox.errors import NeoxError


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # key_valid[b, j] False: slot j of row b is padding and no query may attend to it
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        # position id of the token in each slot, for ALiBi / T5 distances
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0
        self.has_padding = False
        # set by a caller that checked every position it will pass against the model's tables (generate does,
        # up front): the model then skips its per-step check, which reads the positions back from the device
        self.positions_checked = False

    @classmethod
    def for_model(
        cls, model, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> KVCache:
        """A cache shaped for `model` (a neox.model.GPT). dtype defaults to the dtype attention runs in:
        the autocast dtype when autocast is on for the model's device, else the model's parameter dtype."""
        param = model.reference_param()
        device = device or param.device
        if dtype is None:
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else param.dtype
        return cls(model.num_layers, batch_size, max_len, model.num_kv_heads, model.head_dim, dtype, device)

    def mark_padding(self, attention_mask: torch.Tensor) -> None:
        """Declare which of the next attention_mask.shape[1] slots hold real tokens (1) or padding (0)."""
        n = attention_mask.shape[1]
        self._check_room(n)
        valid = attention_mask.to(device=self.key_valid.device, dtype=torch.bool)
        self.key_valid[:, self.length : self.length + n] = valid
        self.has_padding = self.has_padding or not bool(valid.all())

    def record_positions(self, positions: torch.Tensor, batch: int) -> torch.Tensor:
        """Store the position ids [B|1, T] of the tokens about to be written; return those of all keys [B, S]."""
        self._check_batch(batch)
        t = positions.shape[1]
        self._check_room(t)
        self.positions[:, self.length : self.length + t] = positions
        return self.positions[:, : self.length + t]

    def next_positions(self, t: int) -> torch.Tensor:
        """Default position ids [1, T] for the next T tokens: they continue from the cache length."""
        return torch.arange(self.length, self.length + t, device=self.positions.device)[None]

    def visible(self, t: int, batch: int, always: bool) -> torch.Tensor | None:
        """Which keys each of the next T queries may attend to: bool [B|1, 1, T, length + T], True = may.

        None when no mask is needed (unless `always`): a fresh cache without padding is plain causal
        (the caller sets is_causal when length is 0) and a single new token sees every cached key.
        Causality is by slot, never by position value, so left padding cannot let a token see the future.
        """
        if not (always or self.has_padding or (self.length > 0 and t > 1)):
            return None
        device = self.key_valid.device
        q_slot = torch.arange(self.length, self.length + t, device=device)
        k_slot = torch.arange(self.length + t, device=device)
        return self._allowed(q_slot, k_slot, batch)

    def _allowed(self, q_slot: torch.Tensor, k_slot: torch.Tensor, batch: int) -> torch.Tensor:
        allowed = (k_slot[None, :] <= q_slot[:, None])[None, None]  # [1, 1, T, S]
        if self.has_padding:
            allowed = allowed & self.key_valid[:batch, None, None, : k_slot.shape[0]]
            # a padding query would have no key at all; letting it see itself keeps softmax finite
            allowed = allowed | (k_slot[None, :] == q_slot[:, None])[None, None]
        return allowed

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, head_dim] at the current length; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        """Called by the model once every layer has written its T new slots."""
        self.length += t

    def reset(self) -> None:
        self.length = 0
        self.key_valid.fill_(True)
        self.has_padding = False

    def _check_batch(self, batch: int) -> None:
        if batch != self.batch_size:
            raise ValueError(f"KV cache was built for batch {self.batch_size}, got a batch of {batch}")

    def _check_room(self, t: int) -> None:
        if self.length + t > self.max_len:
            raise NeoxError(
                f"KV cache holds {self.max_len} tokens but {self.length + t} were requested; "
                "build it with a larger max_len (prompt length + new tokens)"
            )


class StaticKVCache(KVCache):
    """A KVCache whose tensors keep one shape for the whole generation: keys/values are written at a slot held
    in a tensor and attention always spans all max_len slots, with the slots not yet written masked out.

    Nothing inside forward reads a Python counter, so a compiled decode step (torch.compile, fullgraph) is
    traced once and replayed every step. Masked slots add exact zeros to the softmax, so the output equals the
    growing cache's up to summation order.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot = torch.zeros((), dtype=torch.long, device=self.key_valid.device)  # = length, as a tensor

    def next_positions(self, t: int) -> torch.Tensor:
        return self._slots(t)[None]

    def visible(self, t: int, batch: int, always: bool) -> torch.Tensor:
        return self._allowed(self._slots(t), torch.arange(self.max_len, device=self.slot.device), batch)

    def record_positions(self, positions: torch.Tensor, batch: int) -> torch.Tensor:
        self._check_batch(batch)
        t = positions.shape[1]
        self.positions.index_copy_(1, self._slots(t), positions.expand(batch, t))
        return self.positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self._slots(k.shape[2])
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def advance(self, t: int) -> None:
        self.slot += t

    def sync_length(self) -> int:
        """The Python-side length, read back from the slot tensor (once, outside the compiled step)."""
        self.length = int(self.slot)
        return self.length

    def reset(self) -> None:
        super().reset()
        self.slot.zero_()

    def _slots(self, t: int) -> torch.Tensor:
        return self.slot + torch.arange(t, device=self.slot.device)
