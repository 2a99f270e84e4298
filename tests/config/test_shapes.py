"""The derived MLP width against published model sizes and GPT-NeoX's expansion_factor / mlp_multiple_of rule."""

from neox.config.schema import ModelConfig
from neox.config.shapes import intermediate_size, mlp_width


def test_default_widths_match_published_models():
    assert mlp_width(768, "gelu") == 3072  # Pythia-160M
    assert mlp_width(4096, "swiglu") == 11008  # LLaMA-7B: 8/3 * 4096 = 10922.67, rounded up to 256
    assert mlp_width(5120, "swiglu") == 13824  # LLaMA-13B


def test_neox_knobs():
    assert mlp_width(1000, "gelu", expansion_factor=2.5) == 2500  # no rounding unless asked
    assert mlp_width(1000, "gelu", expansion_factor=2.5, multiple_of=64) == 2560  # 40 * 64
    assert mlp_width(4096, "swiglu", expansion_factor=2.0) == 8192  # an explicit factor drops the 256 rounding
    assert mlp_width(4096, "swiglu", multiple_of=100) == 11000  # ceil(10922 / 100) * 100


def test_an_explicit_intermediate_size_wins():
    assert intermediate_size(ModelConfig(hidden_size=64, intermediate_size=100)) == 100
    assert intermediate_size(ModelConfig(hidden_size=64, activation="geglu")) == 256
