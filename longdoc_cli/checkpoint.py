"""A training run's output directory: claiming it (an exclusive lock, refusing to overwrite what it
should not) and writing checkpoints into it whole (weights, tokenizer files, the resolved config
and a model card), so that a killed run never leaves a half-written model.

    OUT/best/, OUT/last/   Hugging Face-format model directories (see train.py)
    OUT/train_log.jsonl    the run's log;  OUT/.longdoc-train.lock   held while a run writes
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import MODEL_CONFIG_NAME, LongdocConfig, save_config
from .errors import LongdocError, UsageError
from .modelcard import model_card
from .runtime import clean_stale, exclusive_lock, replace_dir, temp_dir

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
OUR_OUTPUTS = ("best", "last", LOG_FILE)
LOCK_FILE = ".longdoc-train.lock"  # held by the run writing into the directory


# ----------------------------------------------------------------------------------------------
# The output directory


def prepare_output_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse a non-empty directory unless resuming (which needs last/) or forced (which removes
    only longdoc's own outputs: best/, last/, train_log.jsonl). ``out`` is a directory already
    unless resuming (:func:`claimed_output_dir` made it)."""
    if resume and force:
        raise UsageError("--resume and --force exclude each other")
    if resume:
        if not (out / "last" / STATE_FILE).is_file():
            raise LongdocError(f"{out}: nothing to resume (no last/{STATE_FILE})")
        return
    if any(p.name != LOCK_FILE for p in out.iterdir()):
        if not force:
            raise UsageError(
                f"{out}: output directory is not empty; pass --resume to continue or --force to overwrite",
            )
        for name in OUR_OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


@contextlib.contextmanager
def claimed_output_dir(out: Path, resume: bool, force: bool) -> Iterator[None]:
    """:func:`prepare_output_dir` under an exclusive lock on OUT/.longdoc-train.lock, held for the
    whole run: a second ``longdoc train`` into the same directory is refused, instead of the two
    runs mixing their checkpoints and logs. A run that fails before writing anything removes the
    directory it created, and the parents it created."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again if the run fails early
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if out.is_dir():
            lock_file = out / LOCK_FILE
            try:
                stack.enter_context(exclusive_lock(lock_file, wait=False))
            except BlockingIOError:
                raise UsageError(
                    f"{out}: another `longdoc train` is writing there; wait for it to finish or choose "
                    "another output directory",
                ) from None
            # Removed while still held (callbacks run last in, first out): the directory ends as
            # the run left it.
            stack.callback(lock_file.unlink, missing_ok=True)
        try:
            if out.is_dir():  # under the lock: no run writes here, every temporary entry is stale
                clean_stale(out)
                for name in ("best", "last"):
                    shutil.rmtree(out / f"{name}.tmp", ignore_errors=True)  # older versions' name
            prepare_output_dir(out, resume, force)
            yield
        except BaseException:
            if created and out.is_dir() and all(p.name == LOCK_FILE for p in out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)  # the lock file goes with it, still held
                for parent in created[1:]:  # innermost first; only while empty
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            raise


def refuse_inputs_in_outputs(cfg: LongdocConfig, out: Path) -> None:
    """--force replaces OUT's best/, last/ and log: refuse up front when the run reads from them
    (``-m OUT/best`` to go on from a result), before anything is deleted."""
    inputs = {"the starting model (model.name)": cfg.model.name, "data.train": cfg.data.train,
              "data.dev": cfg.data.dev}  # fmt: skip
    doomed = [(out / name).resolve() for name in OUR_OUTPUTS]
    for what, value in inputs.items():
        if not value or not Path(value).expanduser().exists():
            continue
        path = Path(value).expanduser().resolve()
        hit = next((d for d in doomed if path == d or path.is_relative_to(d)), None)
        if hit is not None:
            raise UsageError(
                f"{value}: {what} is inside {out / hit.name}, which --force would replace; copy it "
                "elsewhere first or choose another --output",
            )


# ----------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    model,
    cfg: LongdocConfig,
    source_dir: Path,
    out: Path,
    card: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
    same_as: Path | None = None,
) -> None:
    """A complete model directory: weights + config.json, tokenizer files, longdoc.yaml, README.md,
    and what ``extra(dir)`` writes. Written to a temporary directory that then replaces ``out``
    (:func:`runtime.replace_dir`): a run killed while saving leaves the previous ``out`` whole, and
    the next run removes the temporary entries (:func:`runtime.clean_stale`). ``same_as``: a
    directory just saved from this same model state (best/ at this step), whose files are
    hard-linked instead of written again where the filesystem allows (:func:`link_files`)."""
    clean_stale(out.parent, out.name)
    tmp = temp_dir(out.parent, out.name)
    try:
        if same_as is None or not link_files(same_as, tmp, skip=("README.md", STATE_FILE)):
            model.save_pretrained(tmp)
            for name in TOKENIZER_FILES:
                if (source_dir / name).is_file():
                    shutil.copy2(source_dir / name, tmp / name)
            save_config(cfg, tmp / MODEL_CONFIG_NAME)
        (tmp / "README.md").write_text(model_card(cfg, card), encoding="utf-8")
        if extra is not None:
            extra(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def link_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> bool:
    """Hard-link every file of ``src`` (but ``skip``) into the new directory ``dst``: a checkpoint
    saved at the same step as ``src`` then takes no new space. The files are never written in place
    (every save writes a new temporary directory that replaces the old one), so a later save or a
    kill during one cannot change what the other directory holds. False (``dst`` emptied) where the
    filesystem has no hard links; the caller writes the files instead."""
    made: list[Path] = []
    try:
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.is_symlink() and f.name not in skip:
                os.link(f, dst / f.name)
                made.append(dst / f.name)
    except OSError:
        for f in made:
            f.unlink(missing_ok=True)
        return False
    return True
