"""The typed configuration: one dataclass per concern.

Field names are GPT-NeoX's (underscore form) wherever GPT-NeoX has the concept, so that a GPT-NeoX YAML maps
onto these fields mostly by name; `aliases.py` maps the rest. Each field's docstring-comment is its user
documentation: `docs/config.md` is generated from the `help` metadata below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str, choices: tuple | None = None, **meta):
    """A config field with its documentation attached (read by docs generation and validation)."""
    md = {"help": help, **meta}
    if choices is not None:
        md["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


POS_EMBS = ("learned", "sinusoidal", "rotary", "alibi", "rpe", "none")
NORMS = ("layernorm", "rmsnorm", "scalenorm")
ACTIVATIONS = ("gelu", "relu", "silu", "swish", "geglu", "swiglu", "reglu", "mish")
GATED_ACTIVATIONS = ("geglu", "swiglu", "reglu")
TOKENIZERS = (
    "HFTokenizer",
    "GPT2BPETokenizer",
    "CharLevelTokenizer",
    "SPMTokenizer",
    "TiktokenTokenizer",
    "ByteLevelTokenizer",
)
INIT_METHODS = ("normal", "scaled_normal", "small_init", "wang_init", "xavier_uniform", "xavier_normal", "orthogonal")


@dataclass
class ModelConfig:
    num_layers: int = opt(2, "Number of transformer blocks.")
    hidden_size: int = opt(64, "Model width (d_model).")
    num_attention_heads: int = opt(4, "Number of query heads.")
    num_kv_heads: int | None = opt(None, "Key/value heads for grouped-query attention; None = num_attention_heads.")
    seq_length: int = opt(128, "Training sequence length in tokens.")
    max_position_embeddings: int | None = opt(None, "Longest position the model supports; None = seq_length.")
    vocab_size: int | None = opt(
        None, "Padded vocabulary size; None = derived from the tokenizer, padded to make_vocab_size_divisible_by."
    )
    make_vocab_size_divisible_by: int = opt(
        128, "Pad the vocabulary to a multiple of this (times the tensor-parallel size)."
    )
    pos_emb: str = opt("rotary", "Positional encoding.", POS_EMBS)
    rotary_pct: float = opt(1.0, "Fraction of each head's dimensions that rotary embeddings rotate.")
    rotary_emb_base: int = opt(10000, "Rotary embedding base (theta).")
    rope_scaling: dict | None = opt(
        None,
        "RoPE scaling as transformers' rope_scaling names it: {type (or rope_type): linear | dynamic | llama3 | "
        "yarn, factor, ...}; llama3 also reads original_max_position_embeddings (default max_position_embeddings), "
        "low_freq_factor (1), high_freq_factor (4); yarn original_max_position_embeddings, beta_fast (32), "
        "beta_slow (1), attention_factor, mscale, mscale_all_dim, truncate (true); dynamic (NTK) rescales the base "
        "for forwards that reach past original_max_position_embeddings. None = plain rotary.",
    )
    rpe_num_buckets: int = opt(32, "T5 relative-position buckets (pos_emb: rpe).")
    rpe_max_distance: int = opt(128, "T5 relative-position max distance (pos_emb: rpe).")
    norm: str = opt("layernorm", "Normalisation layer.", NORMS)
    layernorm_epsilon: float = opt(1e-5, "Epsilon of layernorm.")
    rms_norm_epsilon: float = opt(1e-8, "Epsilon of rmsnorm.")
    scalenorm_epsilon: float = opt(1e-8, "Epsilon of scalenorm.")
    activation: str = opt("gelu", "MLP activation; geglu/swiglu/reglu are gated (two input projections).", ACTIVATIONS)
    intermediate_size: int | None = opt(
        None,
        "MLP hidden width (of each of w1/w3 when gated); None = 4*hidden_size, or for gated activations 8/3*hidden_size rounded up to a multiple of 256 (LLaMA / GPT-NeoX mlp_type: llama). GPT-NeoX's expansion_factor and mlp_multiple_of are applied when given.",
    )
    gpt_j_residual: bool = opt(False, "Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-J / Pythia).")
    gpt_j_tied: bool = opt(False, "With gpt_j_residual, use one norm for both attention and MLP.")
    no_weight_tying: bool = opt(False, "Untie the input embedding and the output layer.")
    use_bias_in_attn_linear: bool = opt(True, "Bias on the attention projections.")
    use_bias_in_mlp: bool = opt(True, "Bias on the MLP projections.")
    use_bias_in_norms: bool = opt(True, "Bias on layernorm.")
    hidden_dropout: float = opt(0.0, "Dropout on residual branches and embeddings.")
    attention_dropout: float = opt(0.0, "Dropout on attention probabilities.")
    init_method: str = opt("normal", "Initialisation of input-side weights.", INIT_METHODS)
    output_layer_init_method: str = opt("scaled_normal", "Initialisation of residual-output weights.", INIT_METHODS)
    init_method_std: float = opt(0.02, "Standard deviation for normal-type inits.")
    use_mup: bool = opt(
        False,
        "Maximal update parametrisation (muP): attention scores scaled by 1/head_dim, logits by "
        "1/(mup_output_temp * width multiplier), embeddings by mup_embedding_mult, hidden matrices initialised "
        "with std / sqrt(fan-in multiplier) and trained with per-group learning rates (Adam: lr / fan-in "
        "multiplier for hidden matrices; SGD: muP's SGD rates). Width multipliers are this model's widths over "
        "the base model's (mup_base_*).",
    )
    mup_base_config: str | None = opt(
        None,
        "muP base model as a config file (YAML/JSON, neox or GPT-NeoX keys): its hidden_size, "
        "num_attention_heads and intermediate_size fill the mup_base_* fields left unset.",
    )
    mup_base_hidden_size: int | None = opt(
        None, "muP base model width (the width the hyper-parameters were tuned at); None = hidden_size."
    )
    mup_base_num_attention_heads: int | None = opt(
        None, "muP base model's query heads; None = num_attention_heads (heads fixed, head_dim grows with width)."
    )
    mup_base_intermediate_size: int | None = opt(
        None,
        "muP base model's MLP width; None = the default rule's width at mup_base_hidden_size when "
        "intermediate_size follows that rule, else intermediate_size scaled by mup_base_hidden_size / hidden_size.",
    )
    mup_init_scale: float = opt(1.0, "muP: every weight's initial standard deviation is multiplied by this.")
    mup_attn_temp: float = opt(1.0, "muP attention temperature: scores are divided by it (on top of 1/head_dim).")
    mup_output_temp: float = opt(
        1.0, "muP output temperature: logits are divided by it (on top of 1/width multiplier)."
    )
    mup_embedding_mult: float = opt(1.0, "muP: the embedding layer's output is multiplied by this.")
    attention_types: list | None = opt(
        None,
        'Attention type of each layer (GPT-NeoX attention_config, expanded at load: [[["local", "global"], '
        '"all"]] alternates over every layer): global (flash is the same and loads as global), local, '
        "sparse_fixed, sparse_variable, bigbird, bslongformer (DeepSpeed's causal block-sparse layouts, shaped by "
        "sparsity_config). None = global everywhere.",
    )
    sparsity_config: dict = opt(
        {},
        "Block-sparse layout settings read by the non-global layer types, GPT-NeoX's keys and defaults: block (16), "
        "different_layout_per_head, num_local_blocks, num_global_blocks, num_different_global_patterns, "
        "num_random_blocks, local_window_blocks, global_block_indices, global_block_end_indices, "
        "num_sliding_window_blocks. Random blocks are drawn from a fixed per-layer seed (same on every rank and resume).",
    )
    sliding_window_width: int | None = opt(
        None,
        "Mistral-style sliding window (GPT-NeoX's key): each token attends to itself and the previous "
        "sliding_window_width tokens, in every layer. None = no window.",
    )
    use_qk_layernorm: bool = opt(
        False,
        "Normalise queries and keys per head before rotary (QK-norm), with the model's norm type over head_dim; "
        "one norm shared by queries and keys (GPT-NeoX's key).",
    )
    attention_impl: str = opt(
        "auto",
        "How masked attention (ALiBi, T5 bias, documents, windows, block-sparse layers, KV cache) is computed: "
        "auto (FlexAttention on CUDA; on CPU block-sparse for layouts, query-chunked SDPA otherwise), dense (the "
        "[T, T] mask reference), chunked, block_sparse, flex (forward only on CPU). Plain causal attention "
        "always uses SDPA's causal kernel.",
        ("auto", "dense", "chunked", "block_sparse", "flex"),
    )
    moe_num_experts: int = opt(1, "Experts of each MoE layer (GPT-NeoX's key); 1 = dense MLPs everywhere (no MoE).")
    moe_top_k: int = opt(1, "Experts each token is routed to.")
    moe_router_type: str = opt(
        "sinkhorn",
        "Router: topk (the k largest softmax probabilities) or sinkhorn (GPT-NeoX's default, S-BASE: while "
        "training, the k experts of the Sinkhorn-balanced assignment, weighted by softmax (k > 1) or sigmoid "
        "(k = 1) of their logits; plain top-k at evaluation).",
        ("topk", "sinkhorn"),
    )
    moe_jitter_eps: float | None = opt(
        None, "While training, multiply the router's input by uniform noise in [1 - eps, 1 + eps]; None = off."
    )
    moe_lbl_in_fp32: bool = opt(
        False, "Compute the load-balancing loss from fp32 router probabilities (else in the router's dtype)."
    )
    moe_aux_loss_coeff: float = opt(
        0.0,
        "Weight of the Switch/GShard load-balancing loss E * sum_e f_e * P_e per MoE layer (f_e: share of "
        "assignments to expert e, P_e: its mean router probability); 0 = off (GPT-NeoX's dropless MoE has none). "
        "GPT-NeoX's DeepSpeed-MoE key moe_loss_coeff loads as this.",
    )
    moe_z_loss_coeff: float = opt(
        0.0, "Weight of the ST-MoE router z-loss, mean over tokens of logsumexp(router logits)^2; 0 = off."
    )
    moe_expert_interval: int = opt(
        1, "Block i has an MoE MLP when i % moe_expert_interval == 0 (GPT-NeoX's rule); the others stay dense."
    )
    moe_topk_renormalize: bool = opt(
        False,
        "Divide the k selected router probabilities by their sum (Mixtral); GPT-NeoX's routers keep them as they are.",
    )
    moe_token_dropping: bool = opt(
        False,
        "Give each expert a capacity and drop the assignments beyond it (first choices before second choices, "
        "then token order, as GShard); false = dropless, every assignment is computed.",
    )
    moe_train_capacity_factor: float = opt(
        1.0, "With moe_token_dropping: capacity = max(ceil(factor * tokens * k / E), moe_min_capacity) in training."
    )
    moe_eval_capacity_factor: float = opt(1.0, "With moe_token_dropping: the capacity factor at evaluation.")
    moe_min_capacity: int = opt(4, "With moe_token_dropping: the smallest capacity of an expert.")
    moe_num_shared_experts: int = opt(
        0,
        "Always-on experts (DeepSeek-style): every token also passes a dense MLP of width "
        "moe_num_shared_experts * intermediate_size, added to the routed experts' output.",
    )
    moe_dispatch: str = opt(
        "grouped_mm",
        "How the experts run over their tokens: grouped_mm (tokens sorted by expert, torch.nn.functional."
        "grouped_mm; no host sync) or padded (a batched matmul over [experts, load, hidden], the load being the "
        "capacity with token dropping, else the largest expert's load, read back once per layer).",
        ("grouped_mm", "padded"),
    )


@dataclass
class TokenizerConfig:
    tokenizer_type: str = opt(
        "ByteLevelTokenizer",
        "Tokenizer: HFTokenizer, GPT2BPETokenizer, CharLevelTokenizer, SPMTokenizer, TiktokenTokenizer, ByteLevelTokenizer.",
        TOKENIZERS,
    )
    vocab_file: str | None = opt(
        None, "Tokenizer file: HF tokenizer JSON, GPT-2 vocab.json, sentencepiece model or .tiktoken file."
    )
    merge_file: str | None = opt(None, "GPT-2 merges.txt (GPT2BPETokenizer).")
    eod_token: str | None = opt(
        None,
        "End-of-document token (appended by preprocessing, stops generation); None = the type's usual lookup (<|endoftext|>, then </s>, <|end_of_text|>, <eos>; sentencepiece: its eos piece). Must be a token of vocab_file.",
    )
    pad_token: str | None = opt(
        None,
        "Padding token; None = <|padding|> when the vocabulary has it (sentencepiece: its pad piece), else the end-of-document token. Must be a token of vocab_file.",
    )


@dataclass
class DataConfig:
    data_path: str | None = opt(
        None, "One dataset prefix (PREFIX_text_document) split into train/valid/test by `split`."
    )
    train_data_paths: list = opt([], "Training dataset prefixes (blended by train_data_weights).")
    valid_data_paths: list = opt([], "Validation dataset prefixes.")
    test_data_paths: list = opt([], "Test dataset prefixes.")
    label_data_paths: list = opt([], "Label datasets (-100 = no loss) parallel to train_data_paths, for fine-tuning.")
    valid_label_data_paths: list = opt([], "Label datasets parallel to valid_data_paths (validation loss on them).")
    test_label_data_paths: list = opt([], "Label datasets parallel to test_data_paths.")
    pos_train_data_paths: list = opt(
        [], "train_impl dpo / rm: the chosen completions (neox preprocess --preference pairs)."
    )
    neg_train_data_paths: list = opt(
        [], "train_impl dpo / rm: the rejected completions, document i pairs with pos's i."
    )
    pos_valid_data_paths: list = opt([], "Chosen completions of the validation pairs.")
    neg_valid_data_paths: list = opt([], "Rejected completions of the validation pairs.")
    pos_test_data_paths: list = opt([], "Chosen completions of the test pairs.")
    neg_test_data_paths: list = opt([], "Rejected completions of the test pairs.")
    pos_train_label_data_paths: list = opt([], "Labels of pos_train_data_paths (-100 over the prompt).")
    neg_train_label_data_paths: list = opt([], "Labels of neg_train_data_paths (-100 over the prompt).")
    pos_valid_label_data_paths: list = opt([], "Labels of pos_valid_data_paths.")
    neg_valid_label_data_paths: list = opt([], "Labels of neg_valid_data_paths.")
    pos_test_label_data_paths: list = opt([], "Labels of pos_test_data_paths.")
    neg_test_label_data_paths: list = opt([], "Labels of neg_test_data_paths.")
    train_reward_data_paths: list = opt(
        [],
        "train_impl kto: per-document desirability (1 / -1) of train_data_paths (neox preprocess --preference unpaired).",
    )
    valid_reward_data_paths: list = opt([], "train_impl kto: desirability of valid_data_paths.")
    test_reward_data_paths: list = opt([], "train_impl kto: desirability of test_data_paths.")
    train_data_weights: list = opt([], "Blend weights for train_data_paths (default equal).")
    valid_data_weights: list = opt([], "Blend weights for valid_data_paths.")
    test_data_weights: list = opt([], "Blend weights for test_data_paths.")
    weight_by_num_documents: bool = opt(False, "Weight datasets by document count, tempered by weighted_sampler_alpha.")
    weighted_sampler_alpha: float = opt(1.0, "Temperature for weight_by_num_documents.")
    split: str = opt("969,30,1", "Train,valid,test proportions when a single data_path is given.")
    data_impl: str = opt("mmap", "Dataset format (only the GPT-NeoX mmap format).", ("mmap",))
    pack_impl: str = opt(
        "packed",
        "How documents become samples, in GPT-NeoX's order: packed (concatenated and cut into seq_length + 1 "
        "token samples), pack_until_overflow (whole documents packed until the next would overflow, padded), "
        "unpacked (one document per sample, padded or cut).",
        ("packed", "pack_until_overflow", "unpacked"),
    )
    allow_chopped: bool = opt(
        True,
        "pack_until_overflow / unpacked: keep documents longer than seq_length + 1 (cut to it); false leaves "
        "them out. Part of the index cache name (_ac), as in GPT-NeoX.",
    )
    mmap_warmup: bool = opt(False, "Touch every page of the .bin at open.")
    reset_position_ids: bool = opt(False, "Restart position ids at every document boundary.")
    reset_attention_mask: bool = opt(False, "Forbid attention across document boundaries.")
    eod_mask_loss: bool = opt(False, "Do not train on predicting the end-of-document token.")
    num_workers: int = opt(0, "Data-loader worker processes.")
    data_cache_dir: str | None = opt(None, "Where the sampling index .npy files are cached; None = next to the data.")


@dataclass
class TrainConfig:
    train_iters: int = opt(100, "Optimizer steps to train for.")
    train_micro_batch_size_per_gpu: int | None = opt(None, "Sequences per micro-batch per data-parallel rank.")
    gradient_accumulation_steps: int | None = opt(None, "Micro-batches per optimizer step.")
    train_batch_size: int | None = opt(None, "Global batch = micro * accumulation * data-parallel size.")
    seed: int = opt(1234, "Seed for initialisation, dropout and data order.")
    gradient_clipping: float = opt(1.0, "Clip the global gradient norm to this (0 = off).")
    nonfinite_policy: str = opt(
        "skip",
        "A step whose loss or gradient norm is NaN/inf never updates the weights (checked on the device); then: "
        "skip (the batch is consumed, the step counted in the log line's guard_skipped), rollback (reload the "
        "newest checkpoint from before it and go on after the offending batches; needs checkpoint.save) or stop "
        "(one line, nothing saved). Acted on at the next log line or checkpoint. Under fp16 a non-finite "
        "gradient norm is the loss scaler's overflow, as before; only a non-finite loss is this policy's.",
        ("skip", "rollback", "stop"),
    )
    loss_spike_window: int = opt(
        0,
        "Loss-spike detection over this many recent accepted steps (0 = off, else at least 2): a step whose "
        "loss (mean over data-parallel ranks) is more than loss_spike_zscore standard deviations above the "
        "window's mean is a spike, handled by loss_spike_policy.",
    )
    loss_spike_zscore: float = opt(6.0, "How many standard deviations above the window's mean loss is a spike.")
    loss_spike_policy: str = opt(
        "skip", "What a loss spike does, as nonfinite_policy: skip, rollback or stop.", ("skip", "rollback", "stop")
    )
    max_rollbacks: int = opt(
        3, "Rollbacks allowed in one run (the two rollback policies together); one more stops it with one line."
    )
    checkpoint_activations: bool = opt(False, "Recompute each block's activations in the backward pass.")
    checkpoint_num_layers: int = opt(
        1,
        "Transformer blocks per activation checkpoint (checkpoint_granularity: full): only the first block's input is kept.",
    )
    checkpoint_granularity: str = opt(
        "full",
        "What checkpoint_activations recomputes: whole blocks (full), only attention (selective_attention), or "
        "each block except its matmul and attention outputs, which are kept (selective_op, PyTorch's "
        "selective activation checkpointing).",
        ("full", "selective_attention", "selective_op"),
    )
    curriculum_enabled: bool = opt(
        False, "Sequence-length curriculum (DeepSpeed's curriculum_learning.enabled): samples are truncated."
    )
    curriculum_type: str = opt("seqlen", "Curriculum metric (curriculum_learning.curriculum_type).", ("seqlen",))
    curriculum_min_difficulty: int | None = opt(
        None, "First sequence length of the curriculum (curriculum_learning.min_difficulty); required when enabled."
    )
    curriculum_max_difficulty: int | None = opt(
        None, "Last sequence length of the curriculum (curriculum_learning.max_difficulty); None = seq_length."
    )
    curriculum_schedule_type: str = opt(
        "fixed_linear",
        "How the sequence length grows (curriculum_learning.schedule_type).",
        ("fixed_linear", "fixed_root", "fixed_discrete"),
    )
    curriculum_total_steps: int | None = opt(
        None, "Steps from min to max length, fixed_linear/fixed_root (schedule_config.total_curriculum_step)."
    )
    curriculum_difficulty_step: int = opt(
        8, "Lengths are multiples of this, fixed_linear/fixed_root (schedule_config.difficulty_step)."
    )
    curriculum_root_degree: float = opt(2, "Root of the fixed_root schedule (schedule_config.root_degree).")
    curriculum_difficulties: list = opt(
        [], "fixed_discrete lengths, one more than curriculum_max_steps (schedule_config.difficulty)."
    )
    curriculum_max_steps: list = opt(
        [], "fixed_discrete: the last step of each length but the final one (schedule_config.max_step)."
    )
    train_impl: str = opt(
        "normal",
        "Training objective: normal (language modelling), dpo (direct preference optimisation on pos/neg pairs; "
        "the reference is the initial weights, their log-probabilities computed once before the first step), "
        "kto (unpaired desirable/undesirable completions), rm (a reward model on pos/neg pairs: the EOD logit at "
        "the last completion token is the score, trained by the pairwise Bradley-Terry loss; `neox score` rates "
        "JSONL with it), reinforce (online REINFORCE: completions of the train_data_paths prompts sampled from the "
        "policy, scored by reinforce_reward_model, with a baseline and a KL penalty to the starting weights).",
        ("normal", "distill", "dpo", "kto", "rm", "reinforce"),
    )
    reinforce_reward_model: str | None = opt(
        None, "reinforce: the reward-model checkpoint (a train_impl: rm run) that scores the sampled completions."
    )
    reinforce_max_new_tokens: int = opt(32, "reinforce: tokens sampled per completion at most.")
    reinforce_temperature: float = opt(1.0, "reinforce: sampling temperature (above 0).")
    reinforce_samples_per_prompt: int = opt(1, "reinforce: completions sampled for each prompt of a micro-batch.")
    reinforce_leave_one_out: bool = opt(
        False, "reinforce: each completion's baseline is the mean shaped reward of the others in its micro-batch."
    )
    kl_div_beta: float = opt(0.1, "reinforce: weight of the KL penalty log pi - log pi_ref in the shaped reward.")
    distill_teacher: str | None = opt(
        None,
        "train_impl distill: the teacher checkpoint (a neox run or iter_* directory; any size, the same tokenizer), "
        "frozen in inference mode; the loss is distill_alpha * T^2 * KL(teacher_T || student_T) + (1 - "
        "distill_alpha) * the LM loss, softmaxes at T = distill_temperature (neox.train.distill). Validation "
        "reports the student's plain LM loss.",
    )
    distill_alpha: float = opt(0.5, "train_impl distill: weight of the KL term, in [0, 1] (1 - alpha on the LM loss).")
    distill_temperature: float = opt(2.0, "train_impl distill: softmax temperature T of teacher and student (> 0).")
    distill_topk: int = opt(
        0, "train_impl distill: keep the teacher's k most likely tokens (renormalised) in the KL; 0 = all."
    )
    distill_cache: str | None = opt(
        None,
        "train_impl distill: a file of the teacher's top-distill_topk logits for every training sample (written by "
        "neox distill --precompute FILE); the run reads them instead of loading and running the teacher.",
    )
    dpo_beta: float = opt(0.1, "DPO / IPO: the strength of the implicit KL to the reference (beta).")
    dpo_label_smoothing: float = opt(
        0.0, "Conservative DPO: the assumed probability (in [0, 0.5)) that a pair's preference is flipped."
    )
    dpo_reference_free: bool = opt(False, "DPO against a uniform reference (no reference log-probabilities).")
    dpo_loss: str = opt(
        "sigmoid",
        "sigmoid (DPO) or ipo (IPO: squared distance of the log-ratio margin from 1 / (2 beta)).",
        ("sigmoid", "ipo"),
    )
    kto_beta: float = opt(0.1, "KTO: beta of the reward beta * log(pi / pi_ref).")
    kto_desirable_weight: float = opt(1.0, "KTO: weight of the desirable completions' loss (lambda_D).")
    kto_undesirable_weight: float = opt(1.0, "KTO: weight of the undesirable completions' loss (lambda_U).")
    compile: bool = opt(False, "torch.compile the model.")
    device: str = opt("auto", "cpu, cuda, or auto.")
    max_runtime: str | None = opt(
        None,
        "Wall-clock budget of the job: seconds (3600), units (90m, 2h, 1h30m, 1d) or HH:MM:SS, counted from the "
        "start of `neox train` (the launcher's start under --nproc, restarts included). The run saves a "
        "checkpoint and exits with code 75 at the last step boundary from which the next step and the save still "
        "fit (step time: the longest of the last 8 steps; save time: the last save's, or an estimate at 100 MB/s "
        "before one); the same command resumes. Needs checkpoint.save. None = no budget.",
    )
    hang_timeout: float | None = opt(
        None,
        "Seconds without a finished training step (or a checkpoint save starting) after which a process prints "
        "its rank, iteration, pending operation and where its main thread is, and exits with code 124 so that "
        "torchrun --max-restarts can restart the job from the last checkpoint. Evaluations and the first step "
        "(compilation) count against it. None = parallel.dist_timeout_minutes under torchrun, off in one process.",
    )


@dataclass
class OptimizerConfig:
    type: str = opt(
        "adamw",
        "Optimizer: adam = torch.optim.Adam (weight decay added to the gradient), adamw = decoupled weight decay (what GPT-NeoX's `type: Adam` runs: apex FusedAdam in AdamW mode, so it loads as adamw), sgd, lion, sm3, madgrad_wd (MADGRAD with decoupled weight decay), adafactor (torch.optim.Adafactor's algorithm), muon (torch.optim.Muon on hidden matrices, AdamW on embeddings, head, norms and biases).",
        ("adam", "adamw", "sgd", "lion", "sm3", "madgrad_wd", "adafactor", "muon"),
    )
    lr: float = opt(6e-4, "Peak learning rate.")
    betas: list = opt([0.9, 0.95], "Adam betas (Lion: its b1, b2; Muon: betas[0] is Muon's momentum).")
    eps: float = opt(1e-8, "Adam epsilon (also SM3's and MADGRAD's).")
    momentum: float = opt(0.0, "SGD, SM3 and MADGRAD momentum.")
    beta: float = opt(0.0, "SM3's accumulator decay (0 = the paper's sums of squared gradients).")
    use_bnb_optimizer: bool = opt(
        False,
        "8-bit Adam/AdamW state through bitsandbytes (GPT-NeoX's key; needs `pip install bitsandbytes` with a "
        "backend for the training device; whole, unsharded parameters only: zero_stage 0, no tensor parallelism).",
    )
    weight_decay: float = opt(0.0, "Decoupled weight decay (not applied to norms and biases).")


@dataclass
class ScheduleConfig:
    lr_decay_style: str = opt("cosine", "LR decay after warmup.", ("constant", "linear", "cosine", "exponential"))
    lr_decay_iters: int | None = opt(None, "Iterations over which to decay; None = train_iters.")
    lr_decay_fraction: float | None = opt(None, "Decay over this fraction of train_iters (overrides lr_decay_iters).")
    min_lr: float = opt(0.0, "Floor of the learning rate.")
    warmup: float = opt(0.01, "Warmup as a fraction of lr_decay_iters.")
    warmup_iters: int | None = opt(None, "Warmup in iterations (overrides warmup).")


@dataclass
class PrecisionConfig:
    precision: str = opt("fp32", "Training precision.", ("fp32", "bf16", "fp16"))
    bf16_mode: str = opt(
        "autocast", "bf16 via autocast (fp32 master weights) or pure bf16 weights.", ("autocast", "pure")
    )
    fp32_allreduce: bool = opt(
        False,
        "Reduce gradients across data-parallel ranks in fp32 (GPT-NeoX's key). Off: fp16/bf16 runs under FSDP2 "
        "(ZeRO 1-3, and the replicate form used with tensor or pipeline parallelism) reduce-scatter/all-reduce in "
        "the training precision, half the traffic; bf16's 8 mantissa bits make true the safer choice for long "
        "runs over many ranks. Plain DDP (ZeRO 0) reduces the gradients in their own dtype either way.",
    )
    loss_scale: float | None = opt(None, "fp16 static loss scale; None = dynamic.")
    initial_scale_power: int = opt(16, "fp16 dynamic scale starts at 2**this.")
    loss_scale_window: int = opt(1000, "fp16: steps without overflow before the scale doubles.")
    hysteresis: int = opt(2, "fp16: overflows tolerated before the scale halves.")
    min_loss_scale: float = opt(1.0, "fp16: the dynamic scale never goes below this.")
    tf32: bool = opt(
        True,
        "On CUDA, run fp32 matmuls and cuDNN convolutions on TF32 tensor cores (inputs rounded to 10 mantissa "
        "bits, fp32 accumulation; several times faster on Ampere and later); false keeps them IEEE fp32 (exact "
        "comparisons, parity runs). It is what precision: fp32 computes in on a GPU; with bf16/fp16 autocast it "
        "touches only the matmuls autocast leaves in fp32, with pure bf16 none. PyTorch's own default is off; "
        "GPT-NeoX has no such key. No effect on CPU.",
    )


@dataclass
class ParallelConfig:
    pipe_parallel_size: int = opt(1, "Pipeline stages.")
    model_parallel_size: int = opt(1, "Tensor-parallel degree.")
    expert_parallel_size: int = opt(
        1,
        "Expert parallelism: each MoE layer's experts are split over this many data-parallel ranks, tokens "
        "exchanged by all-to-all (GPT-NeoX's moe_expert_parallel_size loads as this). It must divide the "
        "data-parallel size: the experts are replicated over the remaining dp / ep ranks (their gradients averaged "
        "there); composes with ZeRO/HSDP for the dense weights, tensor and pipeline parallelism; needs "
        "moe_dispatch: grouped_mm.",
    )
    sequence_parallel: bool = opt(False, "Shard norms/dropout along the sequence across tensor-parallel ranks.")
    zero_stage: int = opt(
        0, "ZeRO stage: 0 = DDP, 1/2 = FSDP2 without resharding after forward, 3 = full FSDP2 sharding.", (0, 1, 2, 3)
    )
    dp_replicate: int = opt(
        1, "HSDP: replicas across which FSDP shards are replicated (data-parallel = dp_replicate * dp_shard)."
    )
    cpu_offload: bool = opt(
        False,
        "Keep sharded parameters, gradients and optimizer state on CPU (FSDP2 CPUOffloadPolicy; zero_stage 1-3). "
        "One process too: it shards over a one-rank group, so the optimizer runs on the CPU (GPT-NeoX's cpu_adam).",
    )
    pipe_schedule: str = opt(
        "1f1b",
        "Pipeline schedule (interleaved_zero_bubble: ZB1P, splits each backward into input and weight parts to fill the bubble).",
        ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble"),
    )
    pipe_stages_per_rank: int = opt(1, "Virtual stages per pipeline rank (interleaved_1f1b, interleaved_zero_bubble).")
    pipe_partition_method: str = opt(
        "parameters", "Balance pipeline stages by parameter count or by layer count.", ("parameters", "uniform")
    )
    grad_compression: str = opt("none", "DDP gradient compression hook.", ("none", "powersgd", "onebit", "fp16"))
    powersgd_rank: int = opt(1, "Rank of PowerSGD approximation.")
    grad_compression_start_iter: int = opt(
        10,
        "Optimizer steps with uncompressed all-reduce before grad_compression (powersgd, onebit) starts; like GPT-NeoX 1-bit Adam's freeze_step (powersgd needs >= 2, onebit >= 1: smaller values are raised).",
    )
    backend: str = opt(
        "auto",
        "torch.distributed backend: gloo, nccl or auto. On GPUs auto and nccl create every group as "
        "cuda:nccl,cpu:gloo (NCCL for CUDA tensors, gloo for CPU ones such as offloaded gradients).",
    )
    dist_timeout_minutes: float = opt(
        30.0,
        "Minutes a collective waits for the other ranks before the run fails (init_process_group's timeout, "
        "also given to every mesh and pipeline group); raise it when one rank can stall long, e.g. writing a "
        "large checkpoint.",
    )


@dataclass
class CheckpointConfig:
    save: str | None = opt(None, "Directory checkpoints are saved to (also the run directory).")
    load: str | None = opt(None, "Directory to resume from (its latest checkpoint).")
    overwrite: bool = opt(
        False,
        "Start a new run in save although it holds checkpoints that load does not resume: they and metrics.jsonl "
        "are removed first. Without it such a run stops before training.",
    )
    save_interval: int | None = opt(None, "Save every this many iterations (GPT-NeoX checkpoint_factor).")
    extra_save_iters: list = opt([], "Additional iterations to save at.")
    keep_last_n_checkpoints: int | None = opt(None, "Delete older checkpoints beyond this many.")
    finetune: bool = opt(False, "Load weights only; start optimizer, schedule and data from zero.")
    no_load_optim: bool = opt(False, "Do not restore optimizer state.")
    no_load_rng: bool = opt(False, "Do not restore RNG state.")
    async_save: bool = opt(False, "Save in the background on its own process group.")
    on_save_error: str = opt(
        "stop",
        "When a checkpoint cannot be written (disk full, no permission): stop the run with a one-line error, or "
        "continue training and try again at the next save. Either way the earlier checkpoints are untouched.",
        ("stop", "continue"),
    )


@dataclass
class LoggingConfig:
    log_dir: str | None = opt(None, "Run directory for metrics.jsonl and writers; None = checkpoint save dir.")
    log_interval: int = opt(10, "Log every this many iterations.")
    progress_bar: bool = opt(True, "Show a progress bar on interactive terminals.")
    tensorboard_dir: str | None = opt(None, "Write TensorBoard events here (needs the tensorboard extra).")
    use_wandb: bool = opt(False, "Log to Weights & Biases (needs the wandb extra).")
    wandb_project: str = opt("neox", "W&B project.")
    wandb_group: str | None = opt(None, "W&B group.")
    wandb_mode: str = opt("offline", "W&B mode: online or offline.", ("online", "offline", "disabled"))
    log_grad_norm: bool = opt(False, "Log each parameter's gradient norm (gradient_norms/NAME) at log lines.")
    log_param_norm: bool = opt(False, "Log each parameter's norm (parameter_norms/NAME) at log lines.")
    log_gradient_noise_scale: bool = opt(
        False, "Log GPT-NeoX's gradient noise scale estimate (noise_scale), from consecutive steps' gradients."
    )
    gradient_noise_scale_n_batches: int = opt(
        5, "Steps averaged into the big-batch gradient of the noise scale estimate (keeps a copy of the gradients)."
    )
    gradient_noise_scale_cpu_offload: bool = opt(False, "Keep the noise scale's gradient copy in CPU memory.")
    profile: bool = opt(
        False, "Record a torch.profiler trace and a memory record of steps profile_step_start..profile_step_stop."
    )
    profile_step_start: int = opt(10, "First profiled step: the one that begins at this iteration (counted from 0).")
    profile_step_stop: int = opt(12, "Last profiled step: the one that begins at this iteration.")
    profile_dir: str | None = opt(None, "Where profile traces go; None = RUN/profile (RUN: the run directory).")


@dataclass
class EvalConfig:
    eval_interval: int = opt(
        1000, "Evaluate on the validation split every this many iterations; 0 = only at the end of training."
    )
    eval_iters: int = opt(10, "Batches per evaluation.")
    eval_tasks: list = opt([], "lm-evaluation-harness tasks to run during training.")
    eval_tasks_interval: int | None = opt(None, "Run eval_tasks every this many iterations; None = at the end.")
    eval_tasks_limit: int | None = opt(None, "Examples per task (lm-eval --limit).")
    eval_include_path: str | None = opt(None, "Directory of local lm-eval task YAMLs.")


@dataclass
class GenerationConfig:
    text_gen_type: str = opt("unconditional", "Generation mode.", ("unconditional", "input-file", "interactive"))
    sample_input_file: str | None = opt(None, "Prompts, one per line or JSONL with a prompt key.")
    sample_output_file: str | None = opt(None, "Where input-file mode writes JSONL.")
    num_samples: int = opt(1, "Unconditional samples.")
    maximum_tokens: int = opt(64, "Maximum new tokens.")
    temperature: float = opt(1.0, "Sampling temperature (0 = greedy).")
    top_k: int = opt(0, "Keep the k most likely tokens (0 = off).")
    top_p: float = opt(0.0, "Nucleus sampling mass (0 = off).")
    repetition_penalty: float = opt(1.0, "Penalty for tokens already present (1 = off).")
    stop_strings: list = opt([], "Stop when one of these appears.")
    recompute: bool = opt(False, "Recompute the whole sequence each step instead of using the KV cache.")
    compile_decode: bool = opt(
        False,
        "Decode with a torch.compile'd step on a fixed-size cache: faster per token, but the first generation of each batch size compiles (seconds to a minute).",
    )


@dataclass
class LoraConfig:
    rank: int = opt(
        0,
        "LoRA rank r: 0 = off; > 0 freezes every base weight and trains low-rank adapters (A [r, in] random, "
        "B [out, r] zeros) beside the target_modules' linear layers (neox.model.lora). Checkpoints hold the "
        "adapters (and adapter_model.safetensors + adapter_config.json); inference and neox export hf merge them.",
    )
    alpha: float = opt(16.0, "LoRA alpha: the adapter term is scaled by alpha / rank.")
    dropout: float = opt(0.0, "Dropout on the adapter's input (training only), in [0, 1).")
    target_modules: list = opt(
        ["query_key_value", "dense"],
        "Linear layers that get adapters, by attribute name: query_key_value, dense (attention output), "
        "dense_h_to_4h, dense_4h_to_h, w1, w2, w3 (MLP), embed_out, router.",
    )
    quantize: str = opt(
        "none",
        "QLoRA: store the frozen base weights of the adapted linear layers in 4 bits (neox.model.qlora): nf4 "
        "(NormalFloat4, block-wise absmax over 64 weights, as the QLoRA paper) or fp4 (E2M1); dequantised per "
        "matmul into the compute dtype, adapters trained in full precision. A full-precision checkpoint is "
        "quantised as it loads (checkpoint.finetune); the run's checkpoints hold the 4-bit codes. One process "
        "only. bitsandbytes' NF4 kernel is used where it is installed and works offline, else plain PyTorch.",
        choices=("none", "nf4", "fp4"),
    )
    double_quant: bool = opt(
        False,
        "QLoRA double quantisation: the fp32 block maxima stored as int8 around their mean with one fp32 scale "
        "per 256 (about 0.52 instead of 0.56 bytes per quantised weight).",
    )
    quantize_all: bool = opt(
        False, "QLoRA: quantize every linear layer's weight, not only those with adapters (a tied head stays)."
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
