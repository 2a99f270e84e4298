"""Upstream GPT-NeoX configs that use per-layer, block-sparse or sliding-window attention load in
`neox config show` (each with local_setup.yml, as upstream runs them); configs built on layers neox does not
implement are refused in one line that names the layer kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neox.cli import main

UPSTREAM = Path(__file__).parent / "upstream"


def show(capsys, *names: str) -> tuple[int, dict | None, str]:
    rc = main(["config", "show", *(str(UPSTREAM / n) for n in names)])
    out, err = capsys.readouterr()
    return rc, (yaml.safe_load(out) if rc == 0 else None), err


@pytest.mark.parametrize(
    "names, layers, types, window",
    [
        (("sparse.yml",), 2, ["local", "global"], None),
        (("pythia-160M.yml", "sparse.yml"), 12, ["local", "global"] * 6, None),  # how sparse.yml is meant to be used
        (("mistral-7B.yml",), 32, ["global"] * 32, 4096),
        (("llama-7B.yml",), 32, ["global"] * 32, None),
        (("llama2-70B.yml",), 80, ["global"] * 80, None),
        (("codellama-7B.yml",), 32, ["global"] * 32, None),
        (("pythia-160M.yml",), 12, ["global"] * 12, None),
    ],
)
def test_upstream_configs_load(capsys, names, layers, types, window):
    rc, cfg, err = show(capsys, *names, "local_setup.yml")
    assert rc == 0, err
    m = cfg["model"]
    assert m["num_layers"] == layers and m["attention_types"] == types
    assert m["sliding_window_width"] == window
    if "sparse.yml" in names:
        assert m["sparsity_config"] == {"block": 16, "num_local_blocks": 32}


def test_mistral_keeps_its_shape(capsys):
    rc, cfg, err = show(capsys, "mistral-7B.yml", "local_setup.yml")
    assert rc == 0, err
    m = cfg["model"]
    assert (m["num_kv_heads"], m["intermediate_size"], m["activation"], m["seq_length"]) == (8, 14336, "swiglu", 8192)


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "gmlp_small.yml",
            "key 'attention_config': attention type 'gmlp' is not supported: gMLP layers are not implemented",
        ),
        (
            "mamba-130M.yml",
            "key 'attention_config': attention type 'mamba' is not supported: Mamba layers are not implemented",
        ),
        (
            "rwkv-170M.yml",
            "key 'attention_config': attention type 'rwkv' is not supported: RWKV layers are not implemented",
        ),
        ("1-3B-transformer-engine.yml", "key 'te_layernorm_mlp': unsupported value True: TransformerEngine"),
    ],
)
def test_unimplemented_layer_kinds_are_refused_in_one_line(capsys, name, message):
    rc, _, err = show(capsys, name, "local_setup.yml")
    assert rc == 2
    assert err.count("\n") == 1 and message in err, err
