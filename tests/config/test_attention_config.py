"""attention_config, sparsity_config and sliding_window_width as GPT-NeoX reads them, checked at load."""

from __future__ import annotations

import pytest

from neox.config import from_dict, to_dict
from neox.config.attention import layer_sparsity, layer_types, sparsity_params
from neox.config.schema import ModelConfig
from neox.errors import ConfigError


@pytest.mark.parametrize(
    "value, layers, expected",
    [
        ([[["global"], "all"]], 3, ["global"] * 3),  # GPT-NeoX's "every layer" form (refused before: a bug)
        ([[["local", "global"], "all"]], 4, ["local", "global", "local", "global"]),  # configs/sparse.yml
        ([[["flash"], 2], [["sparse_fixed", "bigbird"], 1]], 4, ["global", "global", "sparse_fixed", "bigbird"]),
        (["global", "bslongformer", "sparse_variable"], 3, ["global", "bslongformer", "sparse_variable"]),
        ([[["FLASH"], 2]], 2, ["global", "global"]),
        ([[["local"], 0], [["global"], 2]], 2, ["global", "global"]),
    ],
)
def test_attention_config_expands_to_one_type_per_layer(value, layers, expected):
    cfg = from_dict({"num_layers": layers, "attention_config": value})
    assert cfg.model.attention_types == expected
    assert from_dict(to_dict(cfg)) == cfg  # what checkpoints store loads back to the same config


def test_model_group_form_and_default():
    assert from_dict({"model": {"num_layers": 2, "attention_types": ["local", "global"]}}).model.attention_types == [
        "local",
        "global",
    ]
    assert from_dict({"num_layers": 3}).model.attention_types == ["global"] * 3
    assert layer_types(ModelConfig(num_layers=2)) == ["global", "global"]  # built in code, not loaded


@pytest.mark.parametrize(
    "d, message",
    [
        (
            {"num_layers": 4, "attention_config": [[["global"], 3]]},
            r"key 'attention_config': gives 3 layer types for num_layers 4",
        ),
        ({"num_layers": 2, "attention_config": ["global"]}, r"gives 1 layer types for num_layers 2"),
        (
            {"num_layers": 3, "attention_config": [[["local", "global"], "all"]]},
            r"num_layers 3 is not a multiple of the pattern",
        ),
        (
            {"num_layers": 4, "attention_config": [[["local"], 2], [["global"], "all"]]},
            r"count 'all' must be the only entry",
        ),
        ({"attention_config": [["global", 2]]}, r"key 'attention_config': expected entries like"),
        ({"attention_config": [[["global"], "most"]]}, r"expected a layer count or 'all'"),
        ({"attention_config": "global"}, r"expected a list like"),
        ({"attention_config": [[["sliding"], 2]]}, r"unknown attention type 'sliding'; use one of global, local"),
        (
            {"attention-config": [[["gmlp"], 2]]},
            r"key 'attention-config': attention type 'gmlp' is not supported: gMLP",
        ),
        ({"attention_config": [[["mamba"], 2]]}, r"'mamba' is not supported: Mamba layers are not implemented"),
        ({"attention_config": [[["rwkv"], 2]]}, r"'rwkv' is not supported: RWKV layers are not implemented"),
        (
            {"attention_config": [[["local"], 2]], "seq_length": 100},
            r"key 'attention_config' \(with the default sparsity_config\): block 16 does not divide seq_length 100",
        ),
        (
            {"attention_config": [[["bigbird"], 2]], "seq_length": 96, "sparsity_config": {"block": 64}},
            r"key 'sparsity_config': block 64 does not divide seq_length 96",
        ),
        (
            {"sparsity_config": {"blok": 16}},
            r"key 'sparsity_config.blok': unknown sparsity setting; did you mean 'block'",
        ),
        ({"sparsity_config": {"block": 0}}, r"key 'sparsity_config.block': expected an integer >= 1, got 0"),
        ({"sparsity_config": {"different_layout_per_head": 1}}, r"different_layout_per_head': expected true or false"),
        (
            {"sparsity_config": {"local_window_blocks": []}},
            r"local_window_blocks': expected a non-empty list of positive",
        ),
        (
            {"sparsity_config": {"global_block_indices": [-1]}},
            r"global_block_indices': expected a non-empty list of non-negative",
        ),
        ({"sparsity_config": {"attention": "bidirectional"}}, r"sparsity_config.attention': only 'unidirectional'"),
        ({"sparsity_config": [16]}, r"key 'sparsity_config': expected a mapping"),
        (
            {
                "attention_config": [[["sparse_fixed"], 2]],
                "sparsity_config": {"num_local_blocks": 4, "num_global_blocks": 3},
            },
            r"sparse_fixed: num_global_blocks 3 must divide num_local_blocks 4",
        ),
        (
            {"attention_config": [[["sparse_fixed"], 2]], "sparsity_config": {"num_different_global_patterns": 2}},
            r"num_different_global_patterns > 1 needs different_layout_per_head: true",
        ),
        (
            {
                "attention_config": [[["sparse_fixed"], 2]],
                "sparsity_config": {"num_different_global_patterns": 5, "different_layout_per_head": True},
            },
            r"num_different_global_patterns 5 is more than num_local_blocks / num_global_blocks = 4",
        ),
        (
            {
                "attention_config": [[["bslongformer"], 2]],
                "sparsity_config": {"global_block_indices": [0, 4], "global_block_end_indices": [2]},
            },
            r"1 global_block_end_indices for 2 global_block_indices",
        ),
        (
            {
                "attention_config": [[["sparse_variable"], 2]],
                "sparsity_config": {"global_block_indices": [3], "global_block_end_indices": [3]},
            },
            r"each global block end index must be above its start, got \[\(3, 3\)\]",
        ),
        ({"sliding_window_width": 0}, r"key 'sliding_window_width': must be at least 1"),
        ({"sliding_window_width": "wide"}, r"key 'sliding_window_width': expected an integer"),
    ],
)
def test_bad_attention_settings_are_one_line_errors_naming_the_key(d, message):
    with pytest.raises(ConfigError, match=message) as e:
        from_dict(d)
    assert "\n" not in str(e.value)


def test_windows_wider_than_the_sequence_are_clipped_not_refused():
    # configs/sparse.yml: a 32-block window (for GPT-NeoX's 2048 tokens) over neox's default 128 tokens = 8 blocks
    cfg = from_dict(
        {"attention_config": [[["local", "global"], "all"]], "sparsity_config": {"block": 16, "num_local_blocks": 32}}
    )
    assert cfg.model.attention_types == ["local", "global"] and cfg.model.seq_length == 128
    from_dict({"attention_config": [[["bigbird"], 2]], "seq_length": 64, "sparsity_config": {"num_random_blocks": 9}})


def test_sparsity_rules_apply_only_to_the_types_in_use():
    # a fixed-only rule on a config whose layers are all global (configs/sparse.yml's values kept around)
    cfg = from_dict({"sparsity_config": {"num_local_blocks": 4, "num_global_blocks": 3}, "seq_length": 100})
    assert cfg.model.sparsity_config == {"num_local_blocks": 4, "num_global_blocks": 3}


def test_per_type_defaults_are_gpt_neox_ones():
    d = {"block": 8}
    assert sparsity_params("bigbird", d).num_random_blocks == 1  # bigbird's default
    assert sparsity_params("sparse_variable", d).num_random_blocks == 0  # variable's default
    assert sparsity_params("bigbird", d).num_sliding_window_blocks == 3
    # local: num_local_blocks wins over num_sliding_window_blocks, which wins over 4
    assert (
        sparsity_params("local", {"num_local_blocks": 6, "num_sliding_window_blocks": 2}).num_sliding_window_blocks == 6
    )
    assert sparsity_params("local", {"num_sliding_window_blocks": 2}).num_sliding_window_blocks == 2
    assert sparsity_params("local", {}).num_sliding_window_blocks == 4
    # a type reads only its own keys: bslongformer has no random blocks whatever the config says
    assert sparsity_params("bslongformer", {"num_random_blocks": 3}).num_random_blocks == 0
    cfg = from_dict({"num_layers": 2, "attention_config": ["global", "sparse_fixed"], "sparsity_config": d})
    assert layer_sparsity(cfg.model, 0) is None
    assert layer_sparsity(cfg.model, 1).block == 8 and layer_sparsity(cfg.model, 1).num_local_blocks == 4


def test_sliding_window_and_causal_switches_load():
    cfg = from_dict({"sliding_window_width": 64, "sparsity_config": {"attention": "unidirectional"}})
    assert cfg.model.sliding_window_width == 64
    assert cfg.model.sparsity_config == {}  # the causal-only switch carries nothing
