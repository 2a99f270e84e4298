"""Chat SFT preprocessing: a chat template renders conversations; the label dataset keeps only assistant turns."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import numpy as np
import pytest

from neox.cli import main as cli
from neox.config import from_dict
from neox.data.chat import ChatOptions, ChatTemplate, load_template, preprocess_chat
from neox.data.datasets import build_datasets
from neox.data.indexed import IndexedDataset
from neox.data.loader import batches
from neox.errors import ConfigError, DataError

BYTES = NS(tokenizer_type="ByteLevelTokenizer", vocab_file=None, merge_file=None)
EOD = 256
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine."},
]


def _files(tmp_path, convs, name="chat.jsonl"):
    (tmp_path / "chatml.jinja").write_text(CHATML, encoding="utf-8")
    src = tmp_path / name
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    return str(src), str(tmp_path / "chatml.jinja")


def _prep(tmp_path, convs, name="chat", **kw):
    src, tpl = _files(tmp_path, convs, f"{name}.jsonl")
    opts = ChatOptions(inputs=[src], output_prefix=str(tmp_path / name), template=tpl, **kw)
    return preprocess_chat(opts, BYTES)


def _trained_text(tokens, labels):
    kept = [t for t, lab in zip(tokens, labels) if lab != -100]
    assert all(t == lab for t, lab in zip(tokens, labels) if lab != -100)  # targets are the tokens themselves
    return bytes(t for t in kept if t < 256).decode(), kept.count(EOD)


def test_labels_keep_only_assistant_turns(tmp_path):
    s = _prep(tmp_path, [CONV])
    tokens = IndexedDataset(s.outputs["messages"])[0].tolist()
    labels = IndexedDataset(s.outputs["label"])[0].tolist()
    whole = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONV)
    assert tokens == list(whole.encode()) + [EOD]
    assert len(labels) == len(tokens)
    # the role header "<|im_start|>assistant\n" is context; the answer, its end marker and the EOD are targets
    assert _trained_text(tokens, labels) == ("Hello!<|im_end|>\nFine.<|im_end|>\n", 1)
    first = whole.index("Hello!")
    assert labels[first - 1] == -100 and labels[first] == ord("H")


def test_only_last_and_no_mask(tmp_path):
    s = _prep(tmp_path, [CONV], name="last", only_last_turn=True)
    t, lab = (IndexedDataset(s.outputs[k])[0].tolist() for k in ("messages", "label"))
    assert _trained_text(t, lab) == ("Fine.<|im_end|>\n", 1)
    s = _prep(tmp_path, [CONV], name="all", no_mask=True)
    t, lab = (IndexedDataset(s.outputs[k])[0].tolist() for k in ("messages", "label"))
    assert t == lab


def test_a_conversation_ending_on_the_user_has_an_untrained_eod(tmp_path):
    s = _prep(tmp_path, [CONV[:4]])
    t, lab = (IndexedDataset(s.outputs[k])[0].tolist() for k in ("messages", "label"))
    assert t[-1] == EOD and lab[-1] == -100
    assert _trained_text(t, lab) == ("Hello!<|im_end|>\n", 0)


@pytest.mark.parametrize("pack_impl", ["unpacked", "packed"])
def test_loader_sample_trains_on_assistant_tokens_only(tmp_path, pack_impl):
    convs = [CONV, CONV[:3], [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}]]
    train = _prep(tmp_path, convs, name="train")
    valid = _prep(tmp_path, convs[:1], name="valid")
    cfg = from_dict(
        {
            "train_data_paths": [train.outputs["messages"]],
            "label_data_paths": [train.outputs["label"]],
            "valid_data_paths": [valid.outputs["messages"]],
            "valid_label_data_paths": [valid.outputs["label"]],
            "pack_impl": pack_impl,
            "reset_attention_mask": pack_impl == "packed",
        }
    )
    seq = 160
    tr, va, _ = build_datasets(cfg.data, seq, 1234, (6, 2, 0), return_segments=pack_impl == "packed")
    for ds in (tr, va):
        b = next(batches(ds, 2, eod_id=EOD, reset_attention_mask=pack_impl == "packed"))
        for row in range(2):
            labels, mask = b["labels"][row], b["loss_mask"][row]
            targets = labels[mask > 0].tolist()
            # the targets are answers (a packed sample may cut one at its edges), never user or system words
            text = bytes(t for t in targets if t < 256).decode()
            assert targets and "user" not in text and "Hi?" not in text and "Be brief" not in text
            pieces = text.split("<|im_end|>\n")
            assert all(any(p in a for a in ("Hello!<|im_end|>", "Fine.<|im_end|>", "yz<|im_end|>")) for p in pieces)
            if pack_impl == "unpacked":
                assert set(pieces) <= {"Hello!", "Fine.", "yz", ""}
            assert torch_equal_masked(labels, mask)
        if pack_impl == "packed":
            assert "segment_ids" in b


def torch_equal_masked(labels, mask):
    return bool(((labels == -100) == (mask == 0)).all())


def test_template_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    cfg = {"chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"}
    cfg["bos_token"] = {"content": "<s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tpl = load_template("tokenizer", str(tmp_path / "tokenizer.json"))
    assert tpl.render(CONV[1:3]) == "<s>[user]Hi?[assistant]Hello!"
    # without add_generation_prompt in the template the role marker is part of the answer's text
    assert tpl.segments(CONV[1:3], "assistant") == [("<s>[user]Hi?", False), ("", False), ("[assistant]Hello!", True)]
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match="has no chat_template"):
        load_template("tokenizer", str(tmp_path / "tokenizer.json"))


def test_bad_input_is_one_line_with_file_and_line(tmp_path):
    src, tpl = _files(tmp_path, [CONV])
    with open(src, "a", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user"}]}\n')
    opts = ChatOptions(inputs=[src], output_prefix=str(tmp_path / "bad"), template=tpl)
    with pytest.raises(DataError, match=r"chat\.jsonl:2: messages\[0\] must be an object"):
        preprocess_chat(opts, BYTES)
    assert not list(tmp_path.glob("bad_*"))  # nothing half-written
    with pytest.raises(ConfigError, match="not prefix-stable"):
        ChatTemplate("{% for m in messages|reverse %}{{ m.content }}{% endfor %}", "t.jinja").segments(
            CONV, "assistant"
        )


def test_cli_writes_text_and_label_datasets(tmp_path, capsys):
    src, tpl = _files(tmp_path, [CONV, CONV[:3]])
    out = str(tmp_path / "cli")
    assert cli(["preprocess", "--input", src, "--output-prefix", out, "--chat-template", tpl]) == 0
    assert "2 documents" in capsys.readouterr().out
    t, lab = IndexedDataset(f"{out}_messages_document"), IndexedDataset(f"{out}_messages_label_document")
    assert np.array_equal(t.sizes, lab.sizes) and lab.dtype == np.int32
