"""Checks of a dataset before a run starts: its image files, and expressions the model cannot read as written.

``check_images`` looks at every image of the splits a run uses, reading file headers only (no pixel is decoded),
in a thread pool, and remembers what it saw per file stamp (path, size, modification time) in a small JSON file
that the caller places, so that a second run re-reads nothing unchanged. It raises one ``ImageCheckError``
naming the first few bad files and how many there are.

Caught: a missing file (or a folder in its place), an empty file, a file PIL does not recognise as an image, an
image whose header size differs from the width and height instances.json gives, a JPEG without its end-of-image
marker (FF D9) in its last 4 KiB (a cut-off download: PIL refuses to decode it) and a PNG without its IEND
chunk (cut off; also one that lost only IEND, which PIL would still read). Not caught: damage inside a file of the
right length (corrupt compressed data decodes to garbage or fails only when read), a cut-off file of any other
format, a tiny JPEG cut off after an embedded thumbnail's end marker, and wrong content.

``expression_report`` / ``warn_expressions`` count the expressions that tokenise to nothing but special tokens
(only [UNK], or nothing at all: an emoji, a zero-width space) and those longer than the token budget, which the
official tokenisation cuts (the model reads their beginning only); ``check_user_text`` does the same for one
expression typed by a user.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from refer import ReferDataError

__all__ = [
    "ImageCheck", "ImageCheckError", "ExpressionError", "ExpressionReport", "check_images", "check_user_text",
    "expression_report", "warn_expressions",
]

CACHE_VERSION = 1
TAIL_BYTES = 4096  # how far from the end a format's end marker is looked for (some writers pad after it)
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
SHOWN = 5  # bad files / example expressions named in a message


class ImageCheckError(ReferDataError):
    """Images of the dataset are missing, unreadable, cut off or of another size than the annotations say."""


class ExpressionError(ValueError):
    """A user's expression that the model cannot read: empty, or nothing but unknown characters."""


@dataclass(frozen=True)
class ImageCheck:
    """What ``check_images`` did: images checked, how many of them came from the cache, and the seconds taken."""

    checked: int
    from_cache: int
    seconds: float


# ---------------------------------------------------------------------------------------------------- images
def _inspect(path: str) -> tuple[list | None, str | None]:
    """(cache entry ``[size, mtime_ns, width, height, problem]`` or None, problem) of one file; reads its header
    and, for JPEG and PNG, its last ``TAIL_BYTES``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"cannot be read ({type(e).__name__}: {e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a file"
    stamp = [st.st_size, st.st_mtime_ns]
    if st.st_size == 0:
        return _unusable(stamp, "empty file")
    try:
        with open(path, "rb") as f:
            with Image.open(f) as im:
                width, height, fmt = im.width, im.height, im.format
            marker = END_MARKERS.get(fmt or "")
            if marker is not None:
                f.seek(max(0, st.st_size - TAIL_BYTES))
                if marker not in f.read():
                    problem = f"cut off: no {fmt} end marker"
                    return stamp + [width, height, problem], problem
    except UnidentifiedImageError:
        return _unusable(stamp, "not an image PIL reads")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return _unusable(stamp, f"unreadable header ({type(e).__name__}: {e})")
    return stamp + [width, height, ""], None


def _unusable(stamp: list[int], problem: str) -> tuple[list, str]:
    """The cache entry and problem of a file that is no readable image. Its size is never compared (the problem is
    what is reported), so it is written as 0 x 0."""
    return [*stamp, 0, 0, problem], problem


def _load_cache(cache_file: Path | None) -> dict[str, list]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
        if data.get("version") == CACHE_VERSION and isinstance(data.get("images"), dict):
            # entries of another shape (a file edited by hand) are dropped: those images are read again
            return {path: entry for path, entry in data["images"].items() if _valid_entry(entry)}
    except (OSError, ValueError, AttributeError):
        pass  # unreadable or of another version: start afresh, and overwrite it below
    logging.getLogger(__name__).warning("image check cache %s is unreadable or outdated: checking anew", cache_file)
    return {}


def _valid_entry(entry: Any) -> bool:
    """[size, mtime_ns, width, height, problem] as ``_inspect`` writes it."""
    return (isinstance(entry, list) and len(entry) == 5 and all(isinstance(v, int) for v in entry[:4])
            and isinstance(entry[4], str))


def _save_cache(cache_file: Path, images: dict[str, list]) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(cache_file.name + f".{os.getpid()}.tmp")
    try:
        text = json.dumps({"version": CACHE_VERSION, "images": images}, separators=(",", ":"))
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, cache_file)  # readers see the old file or the new one, never half of one
    except OSError as e:  # (a full disk): only a cache; the next check reads the images again
        tmp.unlink(missing_ok=True)
        logging.getLogger(__name__).warning("image check cache %s not written (%s): the next run checks the images "
                                            "again", cache_file, e.strerror or e)  # fmt: skip


def _image_records(refer: Any, splits: Iterable[str]) -> list[dict]:
    """The images (instances.json records) of the refs of ``splits``, each once."""
    image_ids: dict[Any, None] = {}
    for split in splits:
        ref_ids = refer.getRefIds(split=split)
        if ref_ids:  # getImgIds() of no ref means every image
            image_ids.update(dict.fromkeys(refer.getImgIds(ref_ids)))
    return refer.loadImgs(list(image_ids))


def check_images(
    refer: Any,
    splits: Sequence[str],
    image_dir: str | Path | None = None,
    workers: int = 8,
    cache_file: str | Path | None = None,
) -> ImageCheck:
    """Check that every image of ``splits`` exists, is complete and has the size instances.json gives.

    Args:
        refer: the ``refer.REFER`` of the dataset.
        splits: the splits the run uses (e.g. ``["train", "val"]``).
        image_dir: the image folder (default ``refer.IMAGE_DIR``).
        workers: threads reading headers (file opening waits on the disk; header parsing holds the GIL).
        cache_file: JSON file remembering each checked file's stamp and header (e.g. in the run folder or
            ``~/.cache/lavt``); None: no cache. Entries of other files in it are kept.

    Raises:
        ImageCheckError (a ReferDataError): one line with the number of bad images and the first few of them.
    """
    tic = time.perf_counter()
    if workers < 1:
        raise ValueError(f"check_images: workers must be >= 1, got {workers}")
    folder = os.path.abspath(image_dir if image_dir is not None else refer.IMAGE_DIR)
    records = _image_records(refer, splits)
    paths = [os.path.join(folder, r["file_name"]) for r in records]
    cache_path = Path(cache_file) if cache_file is not None else None
    cache = _load_cache(cache_path)

    def inspect_cached(path: str) -> tuple[list | None, str | None, bool]:
        entry = cache.get(path)
        if entry is not None:
            try:
                st = os.stat(path)
                if [st.st_size, st.st_mtime_ns] == entry[:2]:
                    return entry, entry[4] or None, True
            except OSError:
                pass  # gone since: inspect says how
        return (*_inspect(path), False)

    def inspect_chunk(chunk: list[str]) -> list[tuple[list | None, str | None, bool]]:
        return [inspect_cached(p) for p in chunk]

    size = max(1, min(256, len(paths) // (4 * workers) or 1))  # a task per path would cost more than the stat
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ThreadPoolExecutor(workers) as pool:
        results = [r for chunk in pool.map(inspect_chunk, chunks) for r in chunk]

    bad, hits, changed = [], 0, False
    for record, path, (entry, problem, cached) in zip(records, paths, results):
        hits += cached
        if entry is not None and not cached:
            cache[path], changed = entry, True
        if problem is None and [entry[2], entry[3]] != [record.get("width"), record.get("height")]:
            problem = (f"is {entry[2]}x{entry[3]} (WxH), instances.json says "
                       f"{record.get('width')}x{record.get('height')} for image {record.get('id')}")
        if problem is not None:
            bad.append(f"{record['file_name']} ({problem})")
    if cache_path is not None and changed:
        _save_cache(cache_path, cache)
    if bad:
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise ImageCheckError(
            f"{len(bad)} of {len(records)} images of {refer.dataset} ({refer.splitBy}) {', '.join(splits)} in "
            f"{folder} are missing, unreadable or of the wrong size: {'; '.join(bad[:SHOWN])}{more}"
        )
    return ImageCheck(len(records), hits, time.perf_counter() - tic)


# ---------------------------------------------------------------------------------------------------- expressions
@dataclass
class ExpressionReport:
    """Expressions the model cannot read as written: counts and the first few of each kind.

    ``empty``: tokenised to nothing but special tokens ([CLS], [SEP], [UNK]); ``truncated``: more tokens (with
    [CLS] and [SEP]) than ``max_tokens``, so the official tokenisation cuts them (and their [SEP]).
    """

    total: int
    max_tokens: int
    empty: int = 0
    truncated: int = 0
    empty_examples: list[str] = field(default_factory=list)
    truncated_examples: list[tuple[str, int]] = field(default_factory=list)  # (sentence, its number of tokens)

    def __bool__(self) -> bool:
        return bool(self.empty or self.truncated)


def _special_ids(tokenizer: Any) -> set[int]:
    """[CLS], [SEP], [PAD], [UNK], ... of a Hugging Face tokenizer; none for a bare callable (then only an
    expression of no token at all counts as empty)."""
    return set(getattr(tokenizer, "all_special_ids", ()))


def _full_ids(tokenizer: Any, sentences: Sequence[str]) -> list[list[int]]:
    """The official tokenisation (``data.dataset.tokenize``'s call) before the cut to the budget."""
    return tokenizer(list(sentences), add_special_tokens=True)["input_ids"] if sentences else []


def expression_report(
    tokenizer: Any, sentences: Sequence[str], max_tokens: int, tokenized: tuple[Any, Any] | None = None
) -> ExpressionReport:
    """Count the expressions of ``sentences`` that tokenise to nothing readable, or beyond ``max_tokens``.

    Args:
        tokenized: ``(input_ids, attention_mask)`` [len(sentences), max_tokens] as ``data.dataset.tokenize``
            returned them for these sentences: only the rows that fill the budget are tokenised again (to tell a
            cut expression from one that fits exactly). None: everything is tokenised here.
    """
    special = _special_ids(tokenizer)
    report = ExpressionReport(total=len(sentences), max_tokens=max_tokens)
    if tokenized is None:
        rows = list(enumerate(_full_ids(tokenizer, sentences)))
    else:
        ids, mask = (t.numpy() if hasattr(t, "numpy") else t for t in tokenized)
        lengths = mask.sum(1)
        full = [i for i, n in enumerate(lengths.tolist()) if n >= max_tokens]
        rows = list(zip(full, _full_ids(tokenizer, [sentences[i] for i in full])))
        # the other rows are whole: the empty ones hold special tokens only
        unreadable = ~(mask.astype(bool) & ~_isin(ids, special)).any(1) & (lengths < max_tokens)
        rows += [(i, ids[i, : lengths[i]].tolist()) for i in unreadable.nonzero()[0].tolist()]
        rows.sort()
    for i, row in rows:
        if all(t in special for t in row):
            report.empty += 1
            if len(report.empty_examples) < SHOWN:
                report.empty_examples.append(sentences[i])
        elif len(row) > max_tokens:
            report.truncated += 1
            if len(report.truncated_examples) < SHOWN:
                report.truncated_examples.append((sentences[i], len(row)))
    return report


def _isin(ids: Any, values: set[int]) -> Any:
    import numpy as np

    return np.isin(ids, np.fromiter(values, dtype=np.int64))


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def warn_expressions(report: ExpressionReport, logger: logging.Logger, where: str) -> bool:
    """Log one WARNING for ``report`` (nothing if every expression reads whole); ``where`` names the data (e.g.
    "refcoco (unc) train"). Returns whether it warned."""
    parts = []
    if report.empty:
        examples = ", ".join(_short(s) for s in report.empty_examples)
        parts.append(f"{report.empty} tokenise to nothing the model can read (only [UNK] or no word at all; "
                     f"the model sees an empty expression), e.g. {examples}")
    if report.truncated:
        examples = ", ".join(f"{_short(s)} ({n} tokens)" for s, n in report.truncated_examples)
        parts.append(f"{report.truncated} have more than {report.max_tokens} tokens (MODEL.TEXT.MAX_TOKENS) and "
                     f"are cut, the model reads their beginning only, e.g. {examples}")
    if parts:
        logger.warning("%s: of %d expressions, %s", where, report.total, "; ".join(parts))
    return bool(parts)


def check_user_text(tokenizer: Any, text: str, max_tokens: int) -> str:
    """Check one expression typed by a user before the model reads it.

    Returns "" if it reads whole, else a one-line warning that it is cut to ``max_tokens`` tokens (and what of it
    the model reads). Raises ExpressionError (a ValueError, one line) if it is empty or tokenises to nothing but
    unknown characters.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"the expression must be text, got {type(text).__name__}")
    if not text.strip():
        raise ExpressionError("the expression is empty: describe the object to segment in words")
    ids = _full_ids(tokenizer, [text])[0]
    special = _special_ids(tokenizer)
    if all(t in special for t in ids):
        raise ExpressionError(
            f"the expression {_short(text)} holds no word the tokenizer knows (only unknown or invisible "
            "characters): describe the object in words"
        )
    if len(ids) > max_tokens:
        kept = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
        return (f"the expression has {len(ids)} tokens, more than the {max_tokens} the model reads: it reads only "
                f"{_short(kept, 120)}")
    return ""
