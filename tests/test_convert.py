"""`longdoc convert`: BERT/RoBERTa -> Longformer equals the original (ours and transformers')."""

from __future__ import annotations

import json

import pytest
import torch
from hf_checkpoints import make_tiny_bert, make_tiny_roberta
from typer.testing import CliRunner

from longdoc_cli.cli import app
from longdoc_cli.convert import convert_checkpoint
from longdoc_cli.errors import LongdocError
from longdoc_cli.model import LongformerEncoder
from longdoc_cli.tokenize import DocumentTokenizer

TOL = 1e-4


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "src")


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    return make_tiny_roberta(tmp_path_factory.mktemp("roberta") / "src")


def batch_of(model_dir, lengths, question: bool = False):
    """Real tokenized rows of the given lengths (specials included), padded, with global tokens."""
    tok = DocumentTokenizer.from_dir(model_dir)
    text = " ".join(["the quick brown fox jumps over the lazy dog, 42 times."] * 200)
    enc = tok.encode(text)
    if question:
        windows = [
            tok.question_windows("how many times?", enc, max_tokens=n, doc_stride=0)[0] for n in lengths
        ]
    else:
        windows = [tok.document_windows(enc, max_tokens=n, stride=0)[0] for n in lengths]
    assert [len(w) for w in windows] == list(lengths)
    return tok.collate(windows)


def compare(src, out, batch, reference_cls):
    ref_model = reference_cls.from_pretrained(str(src)).eval()
    ours = LongformerEncoder.from_pretrained(out)
    from transformers import LongformerModel

    hf = LongformerModel.from_pretrained(str(out)).eval()
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if reference_cls.__name__.startswith("Bert"):
        kw["token_type_ids"] = batch["token_type_ids"]
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = ref_model(**kw).last_hidden_state
        got = ours(
            batch["input_ids"],
            batch["attention_mask"],
            batch["global_attention_mask"],
            batch["token_type_ids"],
        )
        got_hf = hf(**kw, global_attention_mask=batch["global_attention_mask"]).last_hidden_state
    assert (got - ref)[real].abs().max() <= TOL
    assert (got_hf - ref)[real].abs().max() <= TOL


@pytest.mark.parametrize("question", [False, True])
def test_bert_conversion_equals_original(bert_dir, tmp_path, question):
    from transformers import BertModel

    out = convert_checkpoint(bert_dir, tmp_path / "lf", max_positions=1024, attention_window=1024)
    compare(bert_dir, out, batch_of(out, [512, 300, 37], question), BertModel)


def test_bert_conversion_default_window_short_inputs(bert_dir, tmp_path):
    from transformers import BertModel

    out = convert_checkpoint(bert_dir, tmp_path / "lf")  # window 512 two-sided covers <= 257 tokens
    compare(bert_dir, out, batch_of(out, [257, 100]), BertModel)


def test_roberta_conversion_equals_original(roberta_dir, tmp_path):
    from transformers import RobertaModel

    out = convert_checkpoint(roberta_dir, tmp_path / "lf", max_positions=2048, attention_window=1024)
    compare(roberta_dir, out, batch_of(out, [512, 65]), RobertaModel)
    compare(roberta_dir, out, batch_of(out, [200], question=True), RobertaModel)


def test_bert_layout_positions_config_and_tokenizer(bert_dir, tmp_path):
    from safetensors.torch import load_file

    out = convert_checkpoint(bert_dir, tmp_path / "lf", max_positions=1300, attention_window=256)
    src = load_file(str(bert_dir / "model.safetensors"))
    new = load_file(str(out / "model.safetensors"))
    old_pos, pos = src["embeddings.position_embeddings.weight"], new["embeddings.position_embeddings.weight"]
    assert pos.shape[0] == 1300 + 1  # pad id 0 -> positions start at row 1
    assert torch.equal(pos[1:513], old_pos) and torch.equal(pos[513:1025], old_pos)
    assert torch.equal(pos[1025:], old_pos[:276])
    for i in range(2):
        p = f"encoder.layer.{i}.attention.self."
        for name in ("query", "key", "value"):
            assert torch.equal(new[f"{p}{name}_global.weight"], src[f"{p}{name}.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "longformer" and config["attention_window"] == [256, 256]
    assert (config["max_position_embeddings"], config["type_vocab_size"], config["layer_norm_eps"]) == (
        1301,
        2,
        1e-12,
    )
    assert (config["pad_token_id"], config["sep_token_id"], config["bos_token_id"]) == (0, 3, 2)
    assert config["longdoc"]["pooling"] == "cls" and len(config["longdoc"]["sha256"]) == 64
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 1300
    assert json.loads((out / "tokenizer.json").read_text())["truncation"] is None
    assert DocumentTokenizer.from_dir(out).max_tokens == 1300


def test_task_checkpoint_prefix_is_stripped(tmp_path):
    src = make_tiny_bert(tmp_path / "cls", prefix_head=True)
    out = convert_checkpoint(src, tmp_path / "lf")
    LongformerEncoder.from_pretrained(out)


def test_other_architecture_is_refused(tmp_path):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2Model"]})
    )
    with pytest.raises(LongdocError, match="model_type 'gpt2' .*BERT and RoBERTa"):
        convert_checkpoint(tmp_path / "gpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert_refuses_non_empty_out_and_force(bert_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["convert", str(bert_dir), str(out)])
    assert r.exit_code == 2 and "not empty" in r.stderr and r.stderr.count("\n") == 1
    r = runner.invoke(app, ["convert", str(bert_dir), str(out), "--force", "--max-positions", "600"])
    assert r.exit_code == 0, r.stderr
    assert (out / "notes.txt").read_text() == "mine"  # user data kept
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 601
    r = runner.invoke(app, ["convert", str(bert_dir), str(tmp_path / "x"), "--attention-window", "511"])
    assert r.exit_code == 2 and "two-sided" in r.stderr
    r = runner.invoke(app, ["convert", str(tmp_path / "missing"), str(tmp_path / "y")])
    assert r.exit_code == 1 and "not a directory" in r.stderr


def test_empty_paths_are_refused(tmp_path, monkeypatch):
    """Path("") is the current directory: an empty OUT must not mean "here"."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["convert", str(tmp_path), ""])
    assert r.exit_code == 2 and "non-empty paths" in r.stderr and list(tmp_path.iterdir()) == []


def test_convert_prints_a_summary(bert_dir, tmp_path):
    r = CliRunner().invoke(app, ["convert", str(bert_dir), str(tmp_path / "lf"), "--max-positions", "256"])
    assert r.exit_code == 0, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("longdoc: convert: compute ") and "total " in line
    assert "max tokens 256" in line and "weights MiB" in line and line.endswith("cpu fp32")
    quiet = CliRunner().invoke(
        app, ["convert", str(bert_dir), str(tmp_path / "q"), "--max-positions", "256", "-q"]
    )
    assert quiet.exit_code == 0 and quiet.stderr == "" and (tmp_path / "q" / "config.json").is_file()
