"""Bilingual word pairs from FreeDict dictionaries in dictd format.

Debian packages them as ``dict-freedict-<src>-<tgt>`` (GPL-2+ and similar licences):
``/usr/share/dictd/freedict-<pair>.index`` and ``freedict-<pair>.dict.dz``.  To get one
without installing a dictionary server::

    apt-get download dict-freedict-eng-deu && dpkg-deb -x dict-freedict-eng-deu_*.deb <dir>

then ``load_freedict("eng-deu", path="<dir>/usr/share/dictd")``.

dictd format: the ``.index`` file has one line per headword, ``headword<TAB>offset<TAB>
length``, where offset and length are numbers written in dictd's base64 digits
(``A-Z a-z 0-9 + /`` = 0..63, most significant first, no padding) and point into the
uncompressed ``.dict`` text (``.dict.dz`` is gzip/dictzip).
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch

from ._bunch import iso639_1, make_bunch

__all__ = ["b64_decode", "b64_encode", "load_freedict", "parse_entry"]

DEFAULT_DICTD_DIR = "/usr/share/dictd"

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {ch: i for i, ch in enumerate(_B64)}


def b64_decode(digits: str) -> int:
    """Decode a dictd base64 number (``"BT9MO"`` -> 22,008,590).

    Examples
    --------
    >>> b64_decode("B"), b64_decode("BA"), b64_decode("/")
    (1, 64, 63)
    """
    if not digits:
        raise ValueError("empty dictd base64 number")
    value = 0
    for ch in digits:
        try:
            value = value * 64 + _B64_VALUE[ch]
        except KeyError:
            raise ValueError(f"{digits!r} is not a dictd base64 number") from None
    return value


def b64_encode(value: int) -> str:
    """Encode a non-negative int as a dictd base64 number (inverse of :func:`b64_decode`).

    Examples
    --------
    >>> b64_encode(0), b64_encode(64), b64_decode(b64_encode(123456789))
    ('A', 'BA', 123456789)
    """
    if value < 0:
        raise ValueError("dictd base64 numbers are non-negative")
    out = _B64[value % 64]
    value //= 64
    while value:
        out = _B64[value % 64] + out
        value //= 64
    return out


# --------------------------------------------------------------------------- parsing
_PRON_RE = re.compile(r"\s/[^/\n]*/")  # " /kˈat/"
_ANNOT_RE = re.compile(r"<[^<>]*>|\[[^\[\]]*\]|\{[^{}]*\}|\([^()]*\)")
_TAG_RE = re.compile(r"<[^<>]*>")
_SENSE_NUM_RE = re.compile(r"^\d+\.\s+")
_KEYWORD_LINE_RE = re.compile(r"^[A-Za-z]+:(\s|$)")  # "Note:", "Synonyms:", "see:"
_SPLIT_RE = re.compile(r"[,;]\s*")
_BAD_RE = re.compile(r"[/<>\[\]{}()\"=+&@#…\d]|\.\.\.")
_LETTER_RE = re.compile(r"[^\W\d_]")
# Valency placeholders ("sb.", "sth.", "etw.", "jdm.", "qn", "qch") mark phrase patterns
# rather than words; items holding them are dropped.
_PLACEHOLDER_WORDS = frozenset(
    "sb. sth. sb sth sb's sb.'s sth.'s one's oneself etw. jdm. jdn. jds. jd. etw jdm jdn jds "
    "qn qch qc qqn qqch qn. qch. algo alguien".split()
)


def _strip_annotations(text: str) -> str:
    if not any(ch in text for ch in "<[{("):
        return text
    prev = None
    while prev != text:  # nested brackets: strip innermost first
        prev = text
        text = _ANNOT_RE.sub(" ", text)
    return text


def _clean_item(item: str, max_words: int) -> str | None:
    """One headword or translation: annotations dropped; None if it is not a short term."""
    words = _strip_annotations(item).split()
    if not words:
        return None
    if not all(w.isalpha() for w in words):
        words = [w for w in words if _LETTER_RE.search(w)]  # drop "´", "-", "..."
        if not words:
            return None
    if len(words) > max_words:
        return None
    text = " ".join(words).replace("\u2010", "-").replace("\u2011", "-")  # Unicode hyphens
    if _BAD_RE.search(text) or not _PLACEHOLDER_WORDS.isdisjoint(text.lower().split()):
        return None
    return text.strip(" ,;:") or None


def parse_entry(entry: str, max_words: int = 3) -> tuple[str | None, list[str]]:
    """Headword and translations of one FreeDict dictd entry.

    Rules: the first line holds the headword, followed by its pronunciation
    (``/.../``), inflected forms in parentheses and grammar tags ``<...>``, all
    dropped.  Translation lines are the following lines indented by at most one
    space that are neither examples (``"..."  - ...``, indented) nor labelled
    (``Note:``, ``Synonyms:``, ``see: {...}``).  A leading sense number ``"2. "`` is
    dropped; the line is split at top-level commas and semicolons; annotations in
    ``<>``, ``[]``, ``{}``, ``()`` are removed, and text after a grammar tag such as
    ``<fem>`` (an abbreviation or symbol) is dropped.  A headword or translation is kept
    only if it is a term of at most ``max_words`` words with letters, without digits,
    ``/``, ellipses or valency placeholders (``sb.``, ``sth.``, ``etw.``, ``jdm.``,
    ``qn``, ...).

    Examples
    --------
    >>> parse_entry("cat /kæt/\\n1. mégère, peau de vache\\n2. chat <masc>\\n")
    ('cat', ['mégère', 'peau de vache', 'chat'])
    """
    lines = entry.split("\n")
    head_line = lines[0]
    head = _clean_item(_PRON_RE.sub(" ", head_line), max_words)
    translations: list[str] = []
    seen: set[str] = set()
    for line in lines[1:]:
        c0 = line[:1]
        if c0 == " ":  # indent 1: "[Am.] term" is a translation, "see: {...}" is not
            if line[1:2] in (" ", "\t", ""):
                continue
            body = line[1:].rstrip()
            if _KEYWORD_LINE_RE.match(body):
                continue
        elif c0 in ("", "\t"):
            continue
        else:
            body = line.rstrip()
        if not body or body[0] == '"' or _KEYWORD_LINE_RE.match(body):
            continue
        if body[0].isdigit():
            body = _SENSE_NUM_RE.sub("", body)
        # Annotations go first ("<v, intr>" holds a comma that must not split the line).
        # Grammar tags "<fem>" end a term: what follows one in the same item is an
        # abbreviation or symbol ("Computertomografie <fem> [med.] CT"), dropped.
        body = _strip_annotations(_TAG_RE.sub("\x01", body))
        for part in _SPLIT_RE.split(body):
            if "\x01" in part:
                part = next((c for c in part.split("\x01") if c.strip()), "")
            t = _clean_item(part, max_words)
            if t and t not in seen:
                seen.add(t)
                translations.append(t)
    return head, translations


# --------------------------------------------------------------------------- files
def _find_files(pair: str, path: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    root = Path(path).expanduser() if path is not None else Path(DEFAULT_DICTD_DIR)
    how = (
        f"Get it with: apt-get download dict-freedict-{pair} && "
        f"dpkg-deb -x dict-freedict-{pair}_*.deb <dir>  then pass "
        f"path='<dir>/usr/share/dictd' (or install it: apt-get install dict-freedict-{pair})."
    )
    if not root.is_dir():
        raise FileNotFoundError(f"No dictd folder {root} for FreeDict {pair!r}. {how}")
    for stem in (f"freedict-{pair}", pair):
        index = root / f"{stem}.index"
        if not index.is_file():
            continue
        for suffix in (".dict.dz", ".dict"):
            dict_file = root / f"{stem}{suffix}"
            if dict_file.is_file():
                return index, dict_file
        raise FileNotFoundError(
            f"{index} has no matching {stem}.dict.dz or {stem}.dict beside it. {how}"
        )
    found = sorted(p.name[: -len(".index")] for p in root.glob("*.index"))
    raise FileNotFoundError(
        f"No FreeDict dictionary {pair!r} in {root} (looked for freedict-{pair}.index and "
        f"{pair}.index; found: {', '.join(found) or 'none'}). {how}"
    )


def _read_dict(dict_file: Path) -> bytes:
    if dict_file.suffix == ".dz":
        try:
            with gzip.open(dict_file, "rb") as fh:
                return fh.read()
        except (OSError, EOFError) as exc:
            raise ValueError(f"{dict_file} is not a gzip/dictzip file ({exc})") from None
    return dict_file.read_bytes()


def _database_info(data: bytes, index_lines: list[tuple[str, int, int]]) -> str:
    for head, off, length in index_lines:
        if head.replace("-", "") == "00databaseshort":
            lines = data[off : off + length].decode("utf-8", "replace").strip().split("\n")
            return " ".join(x.strip() for x in lines[1:] if x.strip()) or lines[0]
    return ""


def load_freedict(
    pair: str = "eng-deu",
    path: str | os.PathLike[str] | None = None,
    max_pairs: int | None = None,
    max_words: int = 3,
) -> Bunch:
    """Load word/short-phrase translation pairs from a FreeDict dictionary.

    Parameters
    ----------
    pair : str, default="eng-deu"
        ``"<src>-<tgt>"`` with ISO 639-3 codes, as in FreeDict's names.
    path : path-like, default=None
        Folder holding ``freedict-<pair>.index`` (or ``<pair>.index``) and the matching
        ``.dict.dz`` (or plain ``.dict``).  Default ``/usr/share/dictd``.
    max_pairs : int, default=None
        Keep the first ``max_pairs`` pairs (in dictionary order).
    max_words : int, default=3
        Longest headword or translation kept, in words.

    Returns
    -------
    bunch : sklearn.utils.Bunch
        ``data``, ``languages`` (ISO 639-1 where one exists, e.g. ``"en"``, ``"de"``),
        ``pair_ids`` (int; one per (headword, translation) pair, so each pair gives a
        source row and a target row), ``target`` (None), ``source_language``,
        ``target_language``, ``n_pairs`` and ``DESCR``.  Rows are language-major:
        all source rows, then all target rows, in pair order.

    Notes
    -----
    Each dictionary entry is read once (the index may list it under several
    headwords) and parsed with :func:`parse_entry`; a headword may have many
    translations (all senses are kept: FreeDict does not order senses), and duplicate
    (headword, translation) pairs are dropped.  Debian bookworm's eng-deu (80 MB of
    text) gives 664,070 pairs in 15-30 s on 2 cores; eng-fra gives 15,479 in 0.5 s.

    Examples
    --------
    >>> from posthoc_align.datasets import load_freedict
    >>> words = load_freedict("eng-fra", max_pairs=1000)  # doctest: +SKIP
    >>> words.data[0], words.data[1000]  # pair 0: English row, French row  # doctest: +SKIP
    ('ago', 'il y a')
    """
    if not isinstance(pair, str) or not re.fullmatch(r"[a-z]{2,3}-[a-z]{2,3}", pair):
        raise ValueError(f"pair must look like 'eng-deu' (ISO 639-3 codes), got {pair!r}")
    if max_pairs is not None and (
        isinstance(max_pairs, bool) or not isinstance(max_pairs, int | np.integer) or max_pairs < 1
    ):
        raise ValueError(f"max_pairs must be a positive int or None, got {max_pairs!r}")
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"max_words must be a positive int, got {max_words!r}")
    src3, tgt3 = pair.split("-")
    src, tgt = iso639_1(src3), iso639_1(tgt3)
    index_file, dict_file = _find_files(pair, path)

    entries: list[tuple[str, int, int]] = []
    with open(index_file, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise ValueError(
                    f"{index_file}:{lineno} is not a dictd index line "
                    f"(headword<TAB>offset<TAB>length): {line[:80]!r}"
                )
            entries.append((parts[0], b64_decode(parts[1]), b64_decode(parts[2])))
    data = _read_dict(dict_file)

    src_words: list[str] = []
    tgt_words: list[str] = []
    seen_entries: set[tuple[int, int]] = set()
    seen_pairs: set[tuple[str, str]] = set()
    limit = max_pairs if max_pairs is not None else -1
    for head, off, length in entries:
        if head.startswith("00database") or head.startswith("00-database"):
            continue
        if (off, length) in seen_entries:
            continue
        seen_entries.add((off, length))
        if off + length > len(data):
            raise ValueError(
                f"{index_file}: entry {head!r} points past the end of {dict_file} "
                "(index and dictionary do not match)"
            )
        text = data[off : off + length].decode("utf-8", "replace")
        headword, translations = parse_entry(text, max_words)
        if not headword:
            continue
        for t in translations:
            key = (headword, t)
            if key in seen_pairs:
                continue
            seen_pairs.add(key)
            src_words.append(headword)
            tgt_words.append(t)
            if len(src_words) == limit:
                break
        if len(src_words) == limit:
            break

    n = len(src_words)
    ids = np.arange(n, dtype=np.int64)
    info = _database_info(data, entries)
    descr = (
        f"FreeDict {pair} ({info or 'dictd dictionary'}) read from {index_file.parent}: "
        f"{n} (headword, translation) pairs, {src} rows then {tgt} rows; pair_ids index "
        f"the pairs. Terms of at most {max_words} words; see parse_entry for the rules."
    )
    return make_bunch(
        src_words + tgt_words,
        [src] * n + [tgt] * n,
        np.concatenate([ids, ids]),
        None,
        descr,
        source_language=src,
        target_language=tgt,
        n_pairs=n,
    )
