"""Adversarial inputs, as an attacker or a careless user would give them (issue 17): special files,
endless and huge inputs, bad JSON-lines records, YAML alias bombs and huge values, bad environment
variables, processes killed while writing, and `train --force` reading from what it replaces.

Each must end in one clear line on stderr and the right exit code, never a hang, a traceback, a
flood of output, lost data or litter that the next run does not clean. Fast cases run in the default
suite (the tiny model of fixtures_tiny); the ones that start subprocesses are marked slow."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longdoc_cli.cli import app
from longdoc_cli.config import ConfigError, _show, load_config
from longdoc_cli.envvars import VARIABLES
from longdoc_cli.errors import LongdocError
from longdoc_cli.runtime import clean_stale, replace_dir, temp_dir
from longdoc_cli.tasks.inputs import InputDoc, InputError, iter_inputs
from longdoc_cli.tasks.runner import batched
from longdoc_cli.textio import RecordError, iter_jsonl_documents, parse_size, read_document
from tests.fixtures_tiny import build_tiny_model, tiny_overrides, write_classification_data
from tests.hf_checkpoints import make_tiny_bert

ROOT = Path(__file__).resolve().parents[1]
SPORT = "The team scored a goal in the football match.\n"


def run(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), input=input, env=env)


def one_error_line(r, *words: str) -> None:
    """Exactly one `longdoc: error:` line, holding ``words``, and no traceback."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("longdoc: error:")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr and r.exception is None or isinstance(r.exception, SystemExit)
    for w in words:
        assert w in errors[0], errors[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("adv") / "tiny")


def classify(tiny_dir: Path, *args: str, **kw):
    return run("classify", "-m", str(tiny_dir), "--labels", "sport,music", "-f", "jsonl", *args, **kw)


def results(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# 3. Unbounded reads: devices, endless streams, huge files and records


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_endless_binary_devices_fail_fast(tiny_dir, device):
    if not Path(device).exists():
        pytest.skip(f"no {device}")
    t0 = time.monotonic()
    r = classify(tiny_dir, device)
    assert r.exit_code == 1 and time.monotonic() - t0 < 60
    one_error_line(r, device, "binary")


def test_dev_null_is_an_empty_document(tiny_dir):
    r = classify(tiny_dir, "/dev/null")
    assert r.exit_code == 1
    one_error_line(r, "/dev/null", "empty")


def test_huge_sparse_file_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "big.txt"
    with big.open("wb") as f:
        f.truncate(5 << 30)  # 5 GiB of holes: reading it would take minutes
    t0 = time.monotonic()
    with pytest.raises(LongdocError, match="limit on one document.*--max-bytes"):
        read_document(str(big))
    assert time.monotonic() - t0 < 5


def test_endless_text_stream_stops_at_the_limit():
    class Endless:
        read_total = 0

        def read(self, n: int = -1) -> bytes:
            n = 1 << 16 if n < 0 else n
            Endless.read_total += n
            return (b"y\n" * n)[:n]

    from longdoc_cli.textio import read_limited

    with pytest.raises(LongdocError, match=r"<stdin>: larger than the 1 MiB limit"):
        read_limited(Endless(), "<stdin>", 1 << 20)
    assert Endless.read_total <= (1 << 20) + 1


def test_max_bytes_option(tiny_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(SPORT * 100)  # 4.6 KB
    r = classify(tiny_dir, str(doc), "--max-bytes", "1K")
    assert r.exit_code == 1
    one_error_line(r, str(doc), "1 KiB limit", "--max-bytes")
    r = classify(tiny_dir, str(doc), "--max-bytes", "64k")
    assert r.exit_code == 0 and len(results(r.stdout)) == 1
    for bad in ("lots", "-5", "0", "1e9999", "9" * 5000, "12Q"):
        r = classify(tiny_dir, str(doc), "--max-bytes", bad)
        assert r.exit_code == 2
        one_error_line(r, "--max-bytes")


def test_parse_size():
    assert parse_size("64M") == 64 << 20 and parse_size("1g") == 1 << 30 and parse_size("500") == 500
    assert parse_size("1.5K") == 1536
    with pytest.raises(LongdocError):
        parse_size("")


def test_stdin_over_the_limit(tiny_dir):
    r = classify(tiny_dir, "-", "--max-bytes", "10K", input=b"word " * 10_000)
    assert r.exit_code == 1
    one_error_line(r, "<stdin>", "limit")


def test_jsonl_record_over_the_limit_is_that_records_error(tiny_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    big = json.dumps({"id": "big", "text": "x " * 20_000})
    data.write_text(
        json.dumps({"id": "a", "text": SPORT})
        + "\n"
        + big
        + "\n"
        + json.dumps({"id": "c", "text": SPORT})
        + "\n"
    )
    r = classify(tiny_dir, str(data), "--max-bytes", "16K")
    assert r.exit_code == 1 and [x["id"] for x in results(r.stdout)] == ["a", "c"]
    one_error_line(r, f"{data}:2", "limit")


def test_jsonl_endless_line_and_nul_bytes(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "ok"}\n' + b"x" * (3 << 20))  # no end of line, 3 MiB
    items = list(iter_jsonl_documents(str(data), max_bytes=1 << 20))
    assert items[0] == ("1", "ok", 1)
    with pytest.raises(LongdocError, match=f"{data}:1: holds NUL bytes"):
        data.write_bytes(b'{"text": "\x00"}\n')
        list(iter_jsonl_documents(str(data)))


def test_zero_device_named_jsonl(tiny_dir, tmp_path):
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    r = classify(tiny_dir, str(link))
    assert r.exit_code == 1
    one_error_line(r, str(link), "NUL")


def test_side_files_are_bounded(tiny_dir, tmp_path):
    for option in ("--labels-file", "--config"):
        r = run("classify", "-m", str(tiny_dir), option, "/dev/zero", str(tmp_path))
        assert r.exit_code in (1, 2)
        one_error_line(r, "/dev/zero", "binary")
    r = run("qa", "-m", str(tiny_dir), "--questions", "/dev/zero", "/dev/null")
    assert r.exit_code in (1, 2)
    one_error_line(r, "/dev/zero", "binary")


# ----------------------------------------------------------------------------------------------
# 4. Special files and hangs


@pytest.fixture()
def zoo(tmp_path) -> Path:
    """A tree with two documents and every kind of special entry."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text(SPORT)
    (tree / "sub" / "b.txt").write_text("The band played a song at the concert.\n")
    os.mkfifo(tree / "c.fifo")
    (tree / "d.broken").symlink_to(tree / "nowhere")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tree / "e.sock"))
    except OSError:
        pass  # path too long for a socket: the rest still tests
    finally:
        sock.close()
    if Path("/dev/null").exists():
        (tree / "f.dev").symlink_to("/dev/null")
    (tree / "g.loop").symlink_to(tree / "g.loop")
    return tree


def test_special_files_under_a_tree_are_skipped_with_a_warning(zoo):
    done: list = []
    worker = threading.Thread(
        target=lambda: done.extend(iter_inputs([str(zoo)], recursive=True)), daemon=True
    )
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "reading a tree with a FIFO hung"
    docs = [x.id for x in done if isinstance(x, InputDoc)]
    assert docs == [str(zoo / "a.txt"), str(zoo / "sub" / "b.txt")]
    skipped = [x for x in done if isinstance(x, InputError)]
    assert skipped and all(x.warning for x in skipped)
    text = "\n".join(x.message for x in skipped)
    assert "c.fifo: a named pipe" in text and "d.broken: a broken symbolic link" in text
    assert "g.loop" in text


def test_special_files_in_a_tree_through_the_cli(tiny_dir, zoo):
    r = classify(tiny_dir, "-r", str(zoo))
    assert r.exit_code == 0, r.stderr
    assert len(results(r.stdout)) == 2
    assert "longdoc: warning:" in r.stderr and "c.fifo" in r.stderr and "Traceback" not in r.stderr
    r = classify(tiny_dir, "-r", "-q", str(zoo))
    assert r.exit_code == 0 and r.stderr == ""


def test_special_files_named_directly(tiny_dir, zoo):
    for name, words, code in [("d.broken", ["broken symbolic link"], 2), ("sub", ["is a directory"], 1)]:
        r = classify(tiny_dir, str(zoo / name))  # a broken link fails before the model loads: exit 2
        assert r.exit_code == code
        one_error_line(r, *words)
    if (zoo / "e.sock").exists():
        r = classify(tiny_dir, str(zoo / "e.sock"))
        assert r.exit_code == 1
        one_error_line(r, "socket")


def test_results_are_not_held_back_behind_a_stalled_input():
    release = threading.Event()

    def slow():
        yield 1
        yield 2
        release.wait(20)  # a FIFO nobody writes to
        yield 3

    chunks = batched(slow(), 8, idle_s=0.2)
    t0 = time.monotonic()
    assert next(chunks) == [1, 2] and time.monotonic() - t0 < 10
    release.set()
    assert list(chunks) == [[3]]


def test_batched_passes_on_the_readers_error():
    def bad():
        yield 1
        raise LongdocError("boom")

    with pytest.raises(LongdocError, match="boom"):
        list(batched(bad(), 4, idle_s=0.1))


# ----------------------------------------------------------------------------------------------
# 5. One bad record does not stop the others


BAD_RECORDS = [
    (b'{"id": ' + b"9" * 5000 + b', "text": "x"}', "number too long"),
    (b'{"id": 1, "text": "x", "n": -' + b"1" * 5000 + b"}", "number too long"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"id": {"a": [1, 2]}, "text": "x"}', "must be a string or a number"),
    (b'{"id": "k", "' + b"t" * 100_000 + b'": 1}', "no 'text' key"),
    (b'{"text": ' + b"1" * 4000 + b"}", "must be a string"),
    (b'{"text": "unterminated', "not valid JSON"),
    (b'{"text": "\xff"}', "not valid UTF-8"),
    (b"null", "expected a JSON object"),
]


@pytest.mark.parametrize(("line", "message"), BAD_RECORDS, ids=[m for _, m in BAD_RECORDS])
def test_bad_record_is_its_own_error(tiny_dir, tmp_path, line, message):
    data = tmp_path / "d.jsonl"
    good = json.dumps({"id": "good", "text": SPORT}).encode()
    data.write_bytes(good + b"\n" + line + b"\n" + good.replace(b"good", b"after") + b"\n")
    other = tmp_path / "other.txt"
    other.write_text(SPORT)
    r = classify(tiny_dir, str(data), str(other))
    assert r.exit_code == 1
    assert [x.get("id", x.get("path")) for x in results(r.stdout)] == ["good", "after", str(other)]
    one_error_line(r, f"{data}:2:", message)
    assert max(map(len, r.stderr.splitlines())) < 1200


def test_many_bad_records_are_summarised(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{bad}\n" * 500 + json.dumps({"text": "fine"}) + "\n")
    items = list(iter_inputs([str(data)]))
    errors = [x for x in items if isinstance(x, InputError)]
    assert len(errors) == 21 and "480 more bad record(s)" in errors[-1].message
    assert [x.text for x in items if isinstance(x, InputDoc)] == ["fine"]


def test_record_errors_keep_their_place_in_shards(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(json.dumps({"id": i, "text": "t"}) if i != 2 else "{bad" for i in range(6)) + "\n"
    )
    seen = [list(iter_inputs([str(data)], shard=(k, 2))) for k in (0, 1)]
    ids = [[x.id if isinstance(x, InputDoc) else "bad" for x in part] for part in seen]
    assert ids == [["0", "bad", "4"], ["1", "3", "5"]]


def test_read_jsonl_yields_record_errors(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n{"id": ' + "1" * 4400 + ', "text": "b"}\n{"text": "c"}\n')
    items = list(iter_jsonl_documents(str(data)))
    assert items[0] == ("1", "a", 1) and items[2] == ("3", "c", 3)
    assert isinstance(items[1], RecordError) and items[1].where == f"{data}:2"


def test_train_data_with_a_huge_number_names_the_line(tmp_path, tiny_dir):
    data = write_classification_data(tmp_path / "train.jsonl")
    with data.open("a") as f:
        f.write('{"id": ' + "7" * 5000 + ', "text": "the goal", "label": "sport"}\n')
    r = run(
        "train", "-", "-o", str(tmp_path / "out"), *[f"--set={s}" for s in tiny_overrides(tiny_dir, data)]
    )
    assert r.exit_code != 0
    one_error_line(r, f"{data}:25", "number too long")


# ----------------------------------------------------------------------------------------------
# 6. Error reporting that explodes: YAML alias bombs, huge values, bounded previews


def bomb_text(where: str) -> str:
    defs = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        defs.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    nested = defs[0]
    for d in defs[1:]:
        nested = f"[{nested}, {d}]"
    if where == "top":
        return nested + "\n"
    if where == "labels":
        return f"task: classify\ninference:\n  labels: {nested}\n"
    return f"task: classify\ninference:\n  {where}: {nested}\n"


@pytest.mark.parametrize("where", ["labels", "top", "batch_size", "aggregate"])
def test_yaml_alias_bombs_are_refused_fast(tmp_path, where):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(bomb_text(where))
    t0 = time.monotonic()
    r = run("config", "validate", str(cfg))
    assert r.exit_code == 2 and time.monotonic() - t0 < 10
    one_error_line(r, str(cfg), "alias")


def test_alias_bomb_in_a_set_override():
    t0 = time.monotonic()
    r = run("config", "validate", "-", "--set", "inference.labels=" + bomb_text("top").strip(), input="")
    assert r.exit_code == 2 and time.monotonic() - t0 < 10
    one_error_line(r, "alias")


def test_recursive_alias_is_refused(tmp_path):
    cfg = tmp_path / "loop.yaml"
    cfg.write_text("inference:\n  labels: &a [x, *a]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(cfg)


def test_a_few_aliases_are_fine(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("task: classify\ninference:\n  labels: &l [sport, music]\n  explain: 2\n")
    assert load_config(cfg).inference.labels == ["sport", "music"]


@pytest.mark.parametrize(
    ("yaml_text", "words"),
    [
        ("train:\n  epochs: " + "9" * 5000 + "\n", ["number too long"]),
        ("inference:\n  labels: " + "x" * 300_000 + "\n", ["inference.labels", "(300000 characters)"]),
        ("inference:\n  labels: [" + ", ".join(["[1]"] * 20_000) + "]\n", ["inference.labels"]),
        ("model:\n  " + "k" * 1000 + ": 1\n", ["unknown key"]),
        ("[" * 50_000 + "]" * 50_000 + "\n", []),
        ("task: " + "q" * 100_000 + "\n", ["task"]),
        ("train:\n  lr: " + "1" * 400 + "e5\n", ["train.lr"]),
    ],
)
def test_huge_yaml_values_give_a_bounded_line(tmp_path, yaml_text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    r = run("config", "validate", str(cfg))
    assert r.exit_code == 2
    assert all(len(line) <= 1200 for line in r.stderr.splitlines()) and len(r.stderr) < 5000
    assert "Traceback" not in r.stderr and r.stderr.startswith("longdoc: error:")
    for w in words:
        assert w in r.stderr


def test_show_is_bounded_without_expanding():
    shared = ["x"] * 10
    for _ in range(30):  # 10**31 leaves if expanded
        shared = [shared] * 10
    t0 = time.monotonic()
    text = _show(shared)
    assert len(text) < 100 and text.startswith("a list [") and time.monotonic() - t0 < 1
    assert _show(10**5000).startswith("an integer of about")
    assert len(_show("y" * 10**6)) < 120


def test_long_cli_values_in_errors_are_bounded(tiny_dir):
    r = run("classify", "-m", "x" * 200_000, "/dev/null")
    assert r.exit_code != 0
    assert all(len(line) <= 1200 for line in r.stderr.splitlines())
    r = run("config", "validate", "-", "--set", "k" * 100_000 + "=1", input="")
    assert r.exit_code == 2 and all(len(line) <= 1200 for line in r.stderr.splitlines())
    r = run("config", "validate", "-", "--set", "train.epochs=" + "9" * 5000, input="")
    assert r.exit_code == 2
    one_error_line(r, "train.epochs", "(5000 characters)")


@pytest.mark.parametrize(
    "option",
    [["--batch-size", "9" * 30], ["--top-k", "9" * 30], ["--explain", "9" * 30], ["--max-length", "9" * 30],
     ["--stride", "9" * 30], ["--threshold", "1e999"], ["--threshold", "nan"], ["--shard", "9" * 5000 + "/1"],
     ["--aggregate", "z" * 10_000], ["--format", "q" * 10_000], ["--device", "d" * 10_000]],
    ids=lambda o: o[0] if isinstance(o, list) else str(o),
)  # fmt: skip
def test_huge_cli_options(tiny_dir, tmp_path, option):
    doc = tmp_path / "d.txt"
    doc.write_text(SPORT)
    r = classify(tiny_dir, str(doc), *option)
    assert r.exit_code in (0, 1, 2) and "Traceback" not in r.stderr
    assert all(len(line) <= 1200 for line in r.stderr.splitlines())
    if r.exit_code == 0:
        assert len(results(r.stdout)) == 1
    else:
        one_error_line(r)


# ----------------------------------------------------------------------------------------------
# 7. Environment variables: every one validated the same way


BAD_ENV = [
    ("LONGDOC_ATTENTION", "bogus"),
    ("LONGDOC_ATTENTION", "Band "),  # case and spaces are forgiven: not an error
    ("LONGDOC_DEBUG", "maybe"),
    ("LONGDOC_FLEX_OPTIONS", "[1, 2]"),
    ("LONGDOC_FLEX_OPTIONS", "{not json"),
    ("LONGDOC_COMPILE_MODE", "fastest"),
    ("LONGDOC_HOME", "bad\x00path"),
    ("LONGDOC_MODEL", "two\nlines"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ENV)
def test_bad_environment_variables(tiny_dir, tmp_path, name, value):
    if "\x00" in value:  # the OS refuses NUL in the environment: test the parser alone
        with pytest.raises(LongdocError, match=name):
            VARIABLES[name](name, value)
        return
    doc = tmp_path / "d.txt"
    doc.write_text(SPORT)
    r = classify(tiny_dir, str(doc), env={name: value})
    if value == "Band ":
        assert r.exit_code == 0, r.stderr
        return
    assert r.exit_code == 2
    one_error_line(r, name)
    r = run("models", "-f", "json", env={name: value})
    assert r.exit_code == 2
    one_error_line(r, name)


@pytest.mark.parametrize(
    "env", [{"RANK": "abc"}, {"WORLD_SIZE": "0"}, {"LOCAL_RANK": "-1"}, {"RANK": "3", "WORLD_SIZE": "2"}]
)
def test_bad_torchrun_variables_in_train(tmp_path, tiny_dir, env):
    data = write_classification_data(tmp_path / "train.jsonl")
    r = run(
        "train",
        "-",
        "-o",
        str(tmp_path / "out"),
        *[f"--set={s}" for s in tiny_overrides(tiny_dir, data)],
        env=env,
    )
    assert r.exit_code == 2
    one_error_line(r, next(iter(env)))
    assert not (tmp_path / "out").exists()


def test_every_variable_read_is_registered():
    """Every `LONGDOC_*` name the package mentions is validated in envvars.VARIABLES."""
    import re

    names = set()
    for file in (ROOT / "longdoc_cli").rglob("*.py"):
        names |= set(re.findall(r"\bLONGDOC_[A-Z_]+\b", file.read_text(encoding="utf-8")))
    assert names <= set(VARIABLES), names - set(VARIABLES)


# ----------------------------------------------------------------------------------------------
# 1. train --force never deletes what it reads


@pytest.mark.parametrize("relative", [False, True])
def test_train_force_refuses_a_model_inside_the_output(tmp_path, tiny_dir, monkeypatch, relative):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_dir, out / "best")
    (out / "train_log.jsonl").write_text("{}\n")
    data = write_classification_data(tmp_path / "train.jsonl")
    model = str(out / "best")
    if relative:
        monkeypatch.chdir(tmp_path)
        model = "out/best"
    sets = [f"--set={s}" for s in tiny_overrides(tiny_dir, data)]
    r = run("train", "-", "--force", "-m", model, "-o", str(out), *sets)
    assert r.exit_code == 2
    one_error_line(r, "--force would replace")
    assert sorted(p.name for p in (out / "best").iterdir()) == sorted(p.name for p in tiny_dir.iterdir())
    assert (out / "train_log.jsonl").read_text() == "{}\n"


def test_train_force_refuses_data_inside_the_output(tmp_path, tiny_dir):
    out = tmp_path / "out"
    (out / "last").mkdir(parents=True)
    data = write_classification_data(out / "last" / "train.jsonl")
    r = run("train", "-", "--force", "-o", str(out), *[f"--set={s}" for s in tiny_overrides(tiny_dir, data)])
    assert r.exit_code == 2
    one_error_line(r, "data.train", "--force would replace")
    assert data.is_file()


# ----------------------------------------------------------------------------------------------
# 2. Interrupted writes leave nothing a later run does not clean


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = [tmp_path / f".m.tmp-{pid}-abc", tmp_path / f"..m.tmp-{pid}-abc.tmp-{pid}-def"]
    for p in stale:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    live = temp_dir(tmp_path, "m")  # ours: kept
    other = tmp_path / f".n.tmp-{pid}-xyz"
    other.mkdir()
    assert sorted(clean_stale(tmp_path, "m")) == sorted(stale)
    assert live.is_dir() and other.is_dir()
    clean_stale(tmp_path)
    assert not other.exists()


def test_kill_between_the_renames_of_a_replace_puts_the_old_one_back(tmp_path):
    final = tmp_path / "last"
    final.mkdir()
    (final / "v").write_text("old")
    script = f"""
import os, signal
from pathlib import Path
from longdoc_cli import runtime
new = runtime.temp_dir(Path({str(tmp_path)!r}), "last")
(new / "v").write_text("new")
real, calls = os.rename, []
def rename(a, b):
    calls.append(a)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
os.rename = rename
runtime.replace_dir(new, Path({str(final)!r}))
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert not final.exists() and len(list(tmp_path.iterdir())) == 2
    clean_stale(tmp_path)
    assert (final / "v").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["last"]


def test_replace_dir(tmp_path):
    final = tmp_path / "x"
    for version in ("one", "two"):
        new = temp_dir(tmp_path, "x")
        (new / "v").write_text(version)
        replace_dir(new, final)
        assert (final / "v").read_text() == version and [p.name for p in tmp_path.iterdir()] == ["x"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGDOC_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _die_in(module: str, function: str, argv: list[str], after: bool = True) -> str:
    """A script that runs `longdoc ARGV` and SIGKILLs itself when ``module.function`` returns (or
    is called, with ``after=False``)."""
    return f"""
import os, signal, sys
import importlib
mod = importlib.import_module({module!r})
real = getattr(mod, {function!r})
def dying(*a, **k):
    if not {after!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(mod, {function!r}, dying)
sys.argv = ["longdoc", *{argv!r}]
from longdoc_cli.cli import main
main()
"""


def _temporaries(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".tmp" in p.name or ".trash" in p.name)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "src")


@pytest.mark.slow
@pytest.mark.parametrize(("function", "after"), [("write_longformer", True), ("_copy_tokenizer", False)])
def test_killed_cache_conversion_is_cleaned_by_the_next_run(tmp_path, bert_dir, function, after):
    home = tmp_path / "home"
    argv = ["models", "-f", "json", "-m", str(bert_dir)]
    p = subprocess.run([sys.executable, "-c", _die_in("longdoc_cli.convert", function, argv, after)],
                       cwd=ROOT, env=_env(LONGDOC_HOME=str(home)), capture_output=True)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert _temporaries(home)  # the killed build left its temporary directories
    p = subprocess.run(
        [sys.executable, "-m", "longdoc_cli", *argv],
        cwd=ROOT,
        env=_env(LONGDOC_HOME=str(home)),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert _temporaries(home) == []


@pytest.mark.slow
def test_killed_convert_is_cleaned_by_the_next_convert(tmp_path, bert_dir):
    out = tmp_path / "lf"
    argv = ["convert", str(bert_dir), str(out)]
    p = subprocess.run([sys.executable, "-c", _die_in("longdoc_cli.convert", "write_longformer", argv)],
                       cwd=ROOT, env=_env(), capture_output=True)  # fmt: skip
    assert p.returncode == -signal.SIGKILL
    assert not out.exists() and _temporaries(tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "longdoc_cli", *argv], cwd=ROOT, env=_env(), capture_output=True
    )
    assert p.returncode == 0, p.stderr
    assert _temporaries(tmp_path) == [] and (out / "config.json").is_file()


@pytest.mark.slow
def test_convert_killed_at_random_moments_leaves_nothing_behind(tmp_path, bert_dir):
    for delay in (0.5, 2.0, 4.0):
        out = tmp_path / f"lf{delay}"
        cmd = [sys.executable, "-m", "longdoc_cli", "convert", str(bert_dir), str(out)]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        p = subprocess.run(cmd + ["--force"], cwd=ROOT, env=_env(), capture_output=True)
        assert p.returncode == 0, p.stderr
        assert _temporaries(tmp_path) == [] and (out / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("function", ["model_card", "save_config"])
def test_killed_checkpoint_save_is_cleaned_by_the_next_run(tmp_path, tiny_dir, function):
    data = write_classification_data(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("task: classify\n")
    argv = ["train", str(cfg), "-o", str(out), *[f"--set={s}" for s in tiny_overrides(tiny_dir, data)]]
    p = subprocess.run([sys.executable, "-c", _die_in("longdoc_cli.checkpoint", function, argv)],
                       cwd=ROOT, env=_env(), capture_output=True)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert _temporaries(out)
    p = subprocess.run([sys.executable, "-m", "longdoc_cli", *argv, "--force"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert _temporaries(out) == [] and (out / "best" / "config.json").is_file()
    assert (out / "last" / "trainer_state.pt").is_file()


@pytest.mark.slow
def test_killed_while_last_links_best_leaves_best_whole(tmp_path, tiny_dir):
    """SIGKILL right after last/ hard-linked best/'s files (step 2, the first evaluation: the best):
    best/ still loads, and the next run cleans up and writes both."""
    from longdoc_cli.model import load_state_dict
    from longdoc_cli.tasks.runner import load_task_model

    data = write_classification_data(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("task: classify\n")
    argv = ["train", str(cfg), "-o", str(out), *[f"--set={s}" for s in tiny_overrides(tiny_dir, data)]]
    p = subprocess.run([sys.executable, "-c", _die_in("longdoc_cli.checkpoint", "link_files", argv)],
                       cwd=ROOT, env=_env(), capture_output=True)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert _temporaries(out) and not (out / "last").exists()
    assert load_state_dict(out / "best") and load_task_model(out / "best", task="classify")
    p = subprocess.run([sys.executable, "-m", "longdoc_cli", *argv, "--force"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert _temporaries(out) == [] and (out / "last" / "trainer_state.pt").is_file()
    for name in ("best", "last"):
        load_task_model(out / name, task="classify")


@pytest.mark.slow
def test_fifo_named_directly_does_not_hold_back_earlier_results(tmp_path, tiny_dir):
    doc = tmp_path / "a.txt"
    doc.write_text(SPORT)
    fifo = tmp_path / "f.fifo"
    os.mkfifo(fifo)
    cmd = [
        sys.executable,
        "-m",
        "longdoc_cli",
        "classify",
        "-m",
        str(tiny_dir),
        "--labels",
        "a,b",
        "-f",
        "jsonl",
        str(doc),
        str(fifo),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()  # arrives while the FIFO still blocks
        assert json.loads(line)["path"] == str(doc)
        with open(fifo, "w") as f:  # now a writer comes: the run finishes
            f.write(SPORT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and len(out.splitlines()) == 1
    finally:
        proc.kill()


# ----------------------------------------------------------------------------------------------
# Neighbours: model directories, questions files, torn logs, config init


def test_model_directory_with_a_bad_config_json(tmp_path, tiny_dir):
    for name, content in [
        ("list", "[1, 2]"),
        ("nested", "[" * 100_000),
        ("number", '{"a": ' + "1" * 5000 + "}"),
    ]:
        model = tmp_path / name
        model.mkdir()
        (model / "config.json").write_text(content)
        r = run("classify", "-m", str(model), "--labels", "a,b", "/dev/null")
        assert r.exit_code == 1, r.stderr
        one_error_line(r, "config.json")
        r = run("convert", str(model), str(tmp_path / f"{name}-out"))
        assert r.exit_code == 1
        one_error_line(r, "config.json")
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "config.json").symlink_to("/dev/zero")
    r = run("classify", "-m", str(zero), "--labels", "a,b", "/dev/null")
    assert r.exit_code != 0 and "Traceback" not in r.stderr


def test_questions_file_with_a_huge_number(tmp_path, tiny_dir):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "who?"}\n{"question": "why?", "id": ' + "9" * 5000 + "}\n")
    r = run("qa", "-m", str(tiny_dir), "--questions", str(questions), "/dev/null")
    assert r.exit_code == 2
    one_error_line(r, f"{questions}:2")


def test_resume_survives_a_log_line_torn_by_a_kill(tmp_path):
    from longdoc_cli.train import _truncate_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    _truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n' and [p.name for p in tmp_path.iterdir()] == [
        log.name
    ]


def test_config_init_leaves_no_temporary_file(tmp_path):
    r = run("config", "init", str(tmp_path / "c.yaml"))
    assert r.exit_code == 0 and [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


def test_unreadable_directory_under_a_tree(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every directory")
    tree = tmp_path / "tree"
    (tree / "locked").mkdir(parents=True)
    (tree / "a.txt").write_text(SPORT)
    (tree / "locked").chmod(0)
    try:
        items = list(iter_inputs([str(tree)], recursive=True))
    finally:
        (tree / "locked").chmod(0o755)
    assert any(isinstance(x, InputError) and "locked" in x.message and not x.warning for x in items)
    assert [x.id for x in items if isinstance(x, InputDoc)] == [str(tree / "a.txt")]


def test_one_document_failing_inside_the_model_is_its_own_error(tiny_dir, tmp_path, monkeypatch):
    from longdoc_cli.tasks.classify import Classifier

    real = Classifier.classify_iter  # what `longdoc classify` runs

    def poisoned(self, docs):
        docs = list(docs)
        if any("poison" in text for _, text in docs):
            raise RuntimeError("kernel failed")
        yield from real(self, docs)

    monkeypatch.setattr(Classifier, "classify_iter", poisoned)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate([SPORT, "poison", SPORT]))
    )
    r = classify(tiny_dir, str(data))
    assert r.exit_code == 1 and [x["id"] for x in results(r.stdout)] == ["0", "2"]
    one_error_line(r, "1: cannot classify it", "kernel failed")


def test_bench_config_is_read_like_a_config(tmp_path):
    bomb = tmp_path / "bench.yaml"
    bomb.write_text(bomb_text("seq_lens"))
    t0 = time.monotonic()
    r = run("bench", "--config", str(bomb))
    assert r.exit_code == 2 and time.monotonic() - t0 < 10
    one_error_line(r, "alias")
    r = run("bench", "--config", "/dev/zero")
    assert r.exit_code == 2
    one_error_line(r, "/dev/zero", "binary")


def test_unhashable_and_duplicate_yaml_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  ? [a, b]\n  : 1\n")
    r = run("config", "validate", str(cfg))
    assert r.exit_code == 2
    one_error_line(r, "unhashable")
    cfg.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    r = run("config", "validate", str(cfg))
    assert r.exit_code == 2
    one_error_line(r, f"{cfg}:3", "the key 'lr' is given twice")


def test_a_model_named_by_the_environment_is_named_in_its_error(tmp_path, tiny_dir):
    doc = tmp_path / "d.txt"
    doc.write_text(SPORT)
    r = run("classify", "--labels", "a,b", str(doc), env={"LONGDOC_MODEL": str(tmp_path / "nowhere")})
    assert r.exit_code == 2
    one_error_line(r, "LONGDOC_MODEL=", "nowhere")
    r = run("classify", "--labels", "a,b", "-f", "jsonl", str(doc), env={"LONGDOC_MODEL": str(tiny_dir)})
    assert r.exit_code == 0 and len(results(r.stdout)) == 1
    r = run("classify", "-m", str(tiny_dir), "--labels", "a,b", str(doc), env={"LONGDOC_MODEL": "/nowhere"})
    assert r.exit_code == 0  # -m wins


def test_a_failure_mid_stream_retries_only_the_unfinished_documents():
    from collections import namedtuple

    from longdoc_cli.cli import _each_or_alone

    calls = []

    def run(pairs):
        calls.append([i for i, _ in pairs])
        for _, text in pairs:
            if text == "bad":
                raise RuntimeError("boom")
            yield text.upper()

    doc = namedtuple("doc", "id text")
    out = [(d.id, r) for d, r in _each_or_alone(run, [doc("a", "x"), doc("b", "bad"), doc("c", "y")])]
    assert out == [("a", "X"), ("b", "RuntimeError: boom"), ("c", "Y")]
    assert calls == [["a", "b", "c"], ["b"], ["c"]]  # "a" was done: not run again
