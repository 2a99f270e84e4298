"""Tensor parallelism with DTensor: the plan for neox.model.GPT, by parameter name (docs/architecture.md).

- attention: query_key_value column-parallel (its rows are grouped per kv group, so an even column split gives
  each rank whole groups: its q heads with their k and v), dense row-parallel; each attention module is told
  its local head counts; ALiBi slopes and T5 relative biases are cut to the rank's heads.
- MLP: dense_h_to_4h / w1 / w3 column-parallel, dense_4h_to_h / w2 row-parallel.
- embeddings: embed_in vocab-parallel (row-wise over the vocabulary); the output layer column-parallel over
  the vocabulary with logits left sharded (a DTensor on the last dim) for `loss_parallel`; the tied head
  reuses the vocab-sharded embed_in weight the same way.
- LoRA adapters follow their layer: a column-parallel layer's lora_A replicated and lora_B split by outputs,
  a row-parallel layer's lora_A split by inputs and lora_B replicated (`_parallelize`).
- sequence parallel: the residual stream between blocks is a DTensor sharded on the sequence dim, so norms and
  dropout run on 1/tp of the tokens; attention and MLP inputs are all-gathered, their outputs
  reduce-scattered. Keeping the stream a DTensor (not its local shard) means `x.shape` stays the global shape
  the model derives positions and masks from.
"""

from __future__ import annotations

from torch import nn

from neox.model.lora import ADAPTER_NAMES
from neox.model.moe import MoE


def _as_replicated_dtensor(mesh):
    """Forward hook: a plain output that is the same on every tp rank becomes a Replicate DTensor, so it can be
    combined with the sequence-sharded stream (positions) or the vocab-sharded tied weight (final norm)."""
    from torch.distributed.tensor import DTensor, Replicate

    def hook(module, args, out):
        if isinstance(out, DTensor):
            return out.redistribute(mesh, [Replicate()])
        return DTensor.from_local(out, mesh, [Replicate()], run_check=False)

    return hook


def _slice_heads(rank: int, local_heads: int):
    """Forward hook for a per-head table shared by the layers, heads on dim 1 (the ALiBi bias [B, H, T, S], the
    block-sparse layouts [1, H, nb, nb]): keep this rank's heads."""

    def hook(module, args, out):
        return out.narrow(1, rank * local_heads, local_heads)

    return hook


def layer_plan(block, sp: bool) -> dict:
    """The plan for one transformer block, keyed by names relative to the block."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    out = Shard(1) if sp else Replicate()
    plan = {
        "attention.query_key_value": ColwiseParallel(),
        "attention.dense": RowwiseParallel(output_layouts=out, use_local_output=not sp),
    }
    if block.attention.rpe is not None:
        # nn.Embedding(buckets, heads): a column split gives each rank its heads' biases
        plan["attention.rpe.relative_attention_bias"] = ColwiseParallel(input_layouts=Replicate())
    if block.attention.qk_layernorm is not None:
        # one norm over head_dim, replicated: the fused q/k view [B, T, kv groups, ., head_dim] is sharded on its
        # kv groups, and the weight's gradient (partial per rank's heads) is summed over the ranks
        plan["attention.qk_layernorm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    if isinstance(block.mlp, MoE):
        pass  # experts and router stay whole on every tensor-parallel rank: the MoE input is replicated
    elif block.mlp.gated:
        plan.update(
            {
                "mlp.w1": ColwiseParallel(),
                "mlp.w3": ColwiseParallel(),
                "mlp.w2": RowwiseParallel(output_layouts=out, use_local_output=not sp),
            }
        )
    else:
        plan.update(
            {
                "mlp.dense_h_to_4h": ColwiseParallel(),
                "mlp.dense_4h_to_h": RowwiseParallel(output_layouts=out, use_local_output=not sp),
            }
        )
    if sp:
        plan["input_layernorm"] = SequenceParallel()
        if block.post_attention_layernorm is not None:
            plan["post_attention_layernorm"] = SequenceParallel()
    return plan


def _parallelize(module: nn.Module, tp_mesh, plan: dict) -> None:
    """parallelize_module, with each LoRA adapter (neox.model.lora: lora_A [r, in], lora_B [out, r] beside the
    weight) placed to match its base layer, so the adapter's term needs no communication of its own:
    column-parallel (weight rows = outputs split): A replicated, B split by output rows, its term comes out
    sharded on the output features as W x does; row-parallel (inputs split): A split by input columns, B
    replicated, its term a partial sum that joins W x's before the layer's own reduction. The adapters are
    taken off while the plan is applied (ColwiseParallel would shard every parameter of the layer on dim 0,
    RowwiseParallel would leave them plain), then put back as DTensors with their requires_grad."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    held = []
    for path, style in plan.items():
        layer = module.get_submodule(path)
        if hasattr(layer, ADAPTER_NAMES[0]) and isinstance(style, (ColwiseParallel, RowwiseParallel)):
            held.append(
                (layer, isinstance(style, ColwiseParallel), {n: layer._parameters.pop(n) for n in ADAPTER_NAMES})
            )
    parallelize_module(module, tp_mesh, plan)
    for layer, column, params in held:
        places = {"lora_A": Replicate() if column else Shard(1), "lora_B": Shard(0) if column else Replicate()}
        for name, p in params.items():
            dist = distribute_tensor(p.detach(), tp_mesh, [places[name]])
            layer.register_parameter(name, nn.Parameter(dist, requires_grad=p.requires_grad))


def _gather_sequence(module, args):
    """Forward pre-hook (sequence parallel): all-gather the sequence-sharded input once per sub-layer, not once
    per projection; the remaining arguments (masks, cache) pass through untouched."""
    from torch.distributed.tensor import DTensor, Replicate

    x = args[0]
    if isinstance(x, DTensor):
        x = x.redistribute(x.device_mesh, [Replicate()]).to_local()
    return (x, *args[1:])


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool) -> nn.Module:
    """Shard `model` (a GPT or a pipeline stage of one) over `tp_mesh` in place; returns it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    tp, rank, sp = tp_mesh.size(), tp_mesh.get_local_rank(), sequence_parallel
    stream = Shard(1) if sp else Replicate()
    top = {}
    if getattr(model, "embed_in", None) is not None:
        top["embed_in"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream, use_local_output=not sp)
    if getattr(model, "final_layer_norm", None) is not None and sp:
        top["final_layer_norm"] = SequenceParallel()
    if getattr(model, "embed_out", None) is not None:
        top["embed_out"] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)
    if top:
        _parallelize(model, tp_mesh, top)

    if sp:
        for name in ("embed_pos", "sinusoidal"):
            if getattr(model, name, None) is not None and getattr(model, "embed_in", None) is not None:
                getattr(model, name).register_forward_hook(_as_replicated_dtensor(tp_mesh))
    if (
        getattr(model, "embed_out", None) is None
        and getattr(model, "tied", False)
        and getattr(model, "embed_in", None) is not None
        and model.final_layer_norm is not None
    ):
        # tied head: linear(final_norm(x), embed_in.weight) with the weight vocab-sharded gives
        # vocab-sharded logits once the activations are a replicated DTensor
        model.final_layer_norm.register_forward_hook(_as_replicated_dtensor(tp_mesh))
    if getattr(model, "alibi", None) is not None:
        model.alibi.register_forward_hook(_slice_heads(rank, model.alibi.num_heads // tp))
    if getattr(model, "layouts", None) is not None:
        # block-sparse layouts [1, H, nb, nb] are built for all heads: keep this rank's, as for ALiBi
        model.layouts.register_forward_hook(_slice_heads(rank, model.layouts.num_heads // tp))

    for block in model.layers.values():
        _parallelize(block, tp_mesh, layer_plan(block, sp))
        if sp:
            block.attention.register_forward_pre_hook(_gather_sequence)
            block.mlp.register_forward_pre_hook(_gather_sequence)
        attn = block.attention
        attn.num_heads //= tp
        attn.num_kv_heads //= tp
    if hasattr(model, "num_kv_heads"):  # the GPT's count sizes KV caches (sampling): this rank's heads
        model.num_kv_heads //= tp
    check_local_heads(model)
    return model


def is_vocab_parallel(logits) -> bool:
    """Whether logits came out vocab-sharded (tensor parallel): the loss must then run under loss_parallel."""
    from torch.distributed.tensor import DTensor

    return isinstance(logits, DTensor)


def check_local_heads(model: nn.Module) -> None:
    """Each attention module's head counts must describe its shard (the forward takes them from the tensor,
    but whatever else reads the attributes must see the local numbers)."""
    for name, block in model.layers.items():
        attn = block.attention
        w = attn.query_key_value.weight
        local_rows = w.to_local().shape[0] if hasattr(w, "to_local") else w.shape[0]
        expect = attn.num_kv_heads * (attn.group + 2) * attn.head_dim
        if local_rows != expect:
            raise RuntimeError(f"layers.{name}.attention: {local_rows} local qkv rows, expected {expect}")
