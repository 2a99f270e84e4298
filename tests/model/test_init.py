"""Every GPT-NeoX init method produces the statistics of its formula, on the weights it is meant for."""

import math

import pytest
import torch

from neox.config.schema import INIT_METHODS, ModelConfig
from neox.model import GPT, init_weights

H, L = 64, 4


def model_with(init_method, output_method="scaled_normal", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_layers=L,
        hidden_size=H,
        num_attention_heads=4,
        vocab_size=512,
        init_method=init_method,
        output_layer_init_method=output_method,
        **kw,
    )
    return GPT(cfg)


EXPECTED_STD = {
    "normal": 0.02,
    "scaled_normal": 0.02 / math.sqrt(2 * L),
    "small_init": math.sqrt(2 / (5 * H)),
    "wang_init": 2 / L / math.sqrt(H),
}


@pytest.mark.parametrize("method", INIT_METHODS)
def test_init_method_statistics(method):
    model = model_with(method, output_method=method, activation="swiglu")
    layer = model.layers["1"]
    for weight in (
        layer.attention.query_key_value.weight,
        layer.attention.dense.weight,
        layer.mlp.w2.weight,
        model.embed_in.weight,
    ):
        fan_out, fan_in = weight.shape
        if method in EXPECTED_STD:
            assert weight.std().item() == pytest.approx(EXPECTED_STD[method], rel=0.06)
            assert abs(weight.mean().item()) < 0.1 * EXPECTED_STD[method]
        elif method.startswith("xavier"):
            std = math.sqrt(2 / (fan_in + fan_out))
            assert weight.std().item() == pytest.approx(std, rel=0.06)
            if method == "xavier_uniform":
                assert weight.abs().max().item() <= math.sqrt(3) * std + 1e-6
        else:  # orthogonal with GPT-NeoX's effective gain sqrt(2): W W^T = 2 I on the smaller side
            gram = weight @ weight.T if fan_out <= fan_in else weight.T @ weight
            torch.testing.assert_close(gram, 2 * torch.eye(gram.shape[0]), atol=1e-4, rtol=0)


def test_input_and_output_methods_go_to_the_right_weights():
    model = model_with("small_init", output_method="wang_init", no_weight_tying=True, pos_emb="learned")
    small, wang = EXPECTED_STD["small_init"], EXPECTED_STD["wang_init"]
    layer = model.layers["0"]
    for w in (
        model.embed_in.weight,
        model.embed_pos.weight,
        model.embed_out.weight,
        layer.attention.query_key_value.weight,
        layer.mlp.dense_h_to_4h.weight,
    ):
        assert w.std().item() == pytest.approx(small, rel=0.06)
    for w in (layer.attention.dense.weight, layer.mlp.dense_4h_to_h.weight):
        assert w.std().item() == pytest.approx(wang, rel=0.06)


def test_biases_zero_and_norms_one():
    model = model_with("normal", norm="layernorm")
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        elif "norm" in name:
            assert bool((p == 1).all()), name


def test_orthogonal_init_on_bf16_weights():
    # QR has no bf16 kernel; the init factorises in fp32 and copies
    model = model_with("orthogonal", output_method="orthogonal").to(torch.bfloat16)
    init_weights(model, model.cfg)
    w = model.layers["0"].attention.dense.weight.float()
    torch.testing.assert_close(w @ w.T, 2 * torch.eye(H), atol=0.05, rtol=0)
