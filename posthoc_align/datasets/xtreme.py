"""Readers for the Tatoeba and BUCC retrieval sets in the XTREME benchmark's file layout.

Neither data set ships with this project or any package it uses: point the readers at
a local copy (e.g. the folders written by XTREME's ``scripts/download_data.sh``).

* Tatoeba (``<dir>/tatoeba.<src>-eng.<src>`` and ``<dir>/tatoeba.<src>-eng.eng``): one
  sentence per line, line *i* of both files are translations.  ``<src>`` is an ISO
  639-3 code (``fra``, ``deu``, ...).  These are LASER's ``data/tatoeba/v1`` files, the
  ones XTREME's ``download_data.sh`` fetches; its preprocessing then writes
  ``<lg>-en.<lg>`` / ``<lg>-en.en`` with the English side *sorted* (hiding the gold
  alignment), from which pairs cannot be recovered, so that folder is refused with a
  message saying where the aligned files are.
* BUCC 2017/2018 (``<dir>/<src>-en.<split>.<src>``, ``<dir>/<src>-en.<split>.en``,
  ``<dir>/<src>-en.<split>.gold``): sentence files hold ``id<TAB>sentence`` lines, the
  gold file ``src_id<TAB>en_id`` lines.  Most sentences have no translation on the other
  side (they are distractors).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch

from ._bunch import as_language_tuple, iso639_1, make_bunch

__all__ = ["load_bucc", "load_tatoeba"]


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        text = fh.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _check_dir(path: str | os.PathLike[str], what: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a folder. Pass the folder holding the {what} files "
            "(XTREME layout, see the module docstring)."
        )
    return root


# --------------------------------------------------------------------------- Tatoeba
_TATOEBA_RE = re.compile(r"^tatoeba\.([A-Za-z_]+)-eng\.\1$")


def _tatoeba_sources(root: Path) -> list[str]:
    return sorted(m.group(1) for p in root.iterdir() if (m := _TATOEBA_RE.match(p.name)))


_XTREME_SORTED_RE = re.compile(r"^([a-z]{2,3})-en\.\1$")


def _refuse_sorted_layout(root: Path) -> None:
    """XTREME's preprocessed Tatoeba files: English side sorted, alignment gone."""
    sorted_pairs = sorted(
        m.group(1)
        for p in root.iterdir()
        if (m := _XTREME_SORTED_RE.match(p.name)) and (root / f"{m.group(1)}-en.en").is_file()
    )
    if sorted_pairs:
        raise ValueError(
            f"{root} holds XTREME's preprocessed Tatoeba files ({sorted_pairs[0]}-en."
            f"{sorted_pairs[0]}, {sorted_pairs[0]}-en.en, ...), whose English side XTREME "
            "sorts, so line i of the two files are not translations. Point load_tatoeba at "
            "LASER's aligned files instead (tatoeba.<src>-eng.<src> / .eng, in "
            "https://github.com/facebookresearch/LASER/tree/main/data/tatoeba/v1)."
        )


def load_tatoeba(
    path: str | os.PathLike[str], languages: str | Iterable[str] | None = None
) -> Bunch:
    """Read Tatoeba sentence pairs (source language - English): LASER's aligned v1 files.

    Parameters
    ----------
    path : path-like
        Folder holding ``tatoeba.<src>-eng.<src>`` and ``tatoeba.<src>-eng.eng``.
    languages : str or sequence of str, default=None
        Source languages to read, as ISO 639-3 file codes (``"fra"``) or ISO 639-1
        codes (``"fr"``).  ``None`` reads every pair found.

    Returns
    -------
    bunch : sklearn.utils.Bunch
        ``data``, ``languages`` (ISO 639-1 where known: ``"en"``, ``"fr"``, ...),
        ``pair_ids`` (int, unique per (file pair, line)), ``target`` (None),
        ``subsets`` (per row, the 3-letter source code of the file pair it comes from:
        select ``subsets == "fra"`` to get one test set) and ``DESCR``.  Rows are
        language-major: all English rows first (file pairs in sorted order), then each
        source language.

    Notes
    -----
    Each file pair has its own English sentences (they differ per language), so an
    English sentence that occurs in two file pairs is two rows with two pair_ids.

    Examples
    --------
    >>> from posthoc_align.datasets import load_tatoeba
    >>> tat = load_tatoeba("xtreme/download/tatoeba", languages=["fra", "deu"])  # doctest: +SKIP
    >>> sorted(set(tat.languages))  # doctest: +SKIP
    ['de', 'en', 'fr']
    """
    root = _check_dir(path, "Tatoeba (tatoeba.<src>-eng.<src>, tatoeba.<src>-eng.eng)")
    found = _tatoeba_sources(root)
    if not found:
        _refuse_sorted_layout(root)
    if languages is None:
        sources = found
        if not sources:
            raise FileNotFoundError(
                f"No Tatoeba files (tatoeba.<src>-eng.<src>) in {root}; check the folder."
            )
    else:
        wanted = as_language_tuple(languages)
        by_code: dict[str, str] = {}
        for src in found:
            by_code.setdefault(src.lower(), src)
            by_code.setdefault(iso639_1(src), src)
        sources = []
        for lang in wanted:
            src = by_code.get(lang.lower())
            if src is None:
                raise FileNotFoundError(
                    f"No Tatoeba files for {lang!r} in {root} (expected "
                    f"tatoeba.<src>-eng.<src> and tatoeba.<src>-eng.eng). Languages found: "
                    f"{', '.join(found) or 'none'}."
                )
            if src in sources:
                raise ValueError(f"languages names {src!r} twice")
            sources.append(src)

    en_rows: list[str] = []
    en_ids: list[int] = []
    en_subsets: list[str] = []
    blocks: list[tuple[str, list[str], list[int]]] = []
    offset = 0
    for src in sources:
        src_file = root / f"tatoeba.{src}-eng.{src}"
        eng_file = root / f"tatoeba.{src}-eng.eng"
        if not eng_file.is_file():
            raise FileNotFoundError(f"{src_file} has no English side: {eng_file} is missing.")
        src_lines = _read_lines(src_file)
        eng_lines = _read_lines(eng_file)
        if len(src_lines) != len(eng_lines):
            raise ValueError(
                f"{src_file.name} has {len(src_lines)} lines but {eng_file.name} has "
                f"{len(eng_lines)}; the files must be line-aligned translations."
            )
        ids = list(range(offset, offset + len(src_lines)))
        offset += len(src_lines)
        en_rows.extend(eng_lines)
        en_ids.extend(ids)
        en_subsets.extend([src] * len(ids))
        blocks.append((src, src_lines, ids))

    data = list(en_rows)
    langs = ["en"] * len(en_rows)
    pair_ids = list(en_ids)
    subsets = list(en_subsets)
    for src, lines, ids in blocks:
        data.extend(lines)
        langs.extend([iso639_1(src)] * len(lines))
        pair_ids.extend(ids)
        subsets.extend([src] * len(lines))
    descr = (
        f"Tatoeba test pairs (XTREME layout) read from {root}: "
        + ", ".join(f"{src}-eng ({len(lines)} pairs)" for src, lines, _ in blocks)
        + ". English rows first; pair_ids unique per (file pair, line); 'subsets' names "
        "the file pair of each row."
    )
    return make_bunch(
        data,
        langs,
        np.asarray(pair_ids, dtype=np.int64),
        None,
        descr,
        subsets=np.asarray(subsets, dtype=str),
    )


# --------------------------------------------------------------------------- BUCC
def _read_bucc_sentences(path: Path) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        sid, sep, text = line.partition("\t")
        if not sep or not sid:
            raise ValueError(f"{path}:{lineno} is not an 'id<TAB>sentence' line: {line[:80]!r}")
        ids.append(sid)
        texts.append(text)
    dup = len(ids) - len(set(ids))
    if dup:
        raise ValueError(f"{path} repeats {dup} sentence ids; ids must be unique")
    return ids, texts


def load_bucc(path: str | os.PathLike[str], pair: str = "de-en", split: str = "test") -> Bunch:
    """Read a BUCC bitext-mining set (XTREME layout) with gold pairs and distractors.

    Parameters
    ----------
    path : path-like
        Folder holding ``<src>-en.<split>.<src>``, ``<src>-en.<split>.en`` and
        ``<src>-en.<split>.gold``.
    pair : str, default="de-en"
        ``"<src>-en"`` (``"en-<src>"`` is accepted too); BUCC has de, fr, ru, zh.
    split : str, default="test"
        The split in the file names (XTREME: ``"dev"``, ``"test"``; BUCC 2018:
        ``"sample"``, ``"training"``).

    Returns
    -------
    bunch : sklearn.utils.Bunch
        ``data``, ``languages`` (``src`` rows first, then ``"en"``), ``pair_ids``
        (int), ``target`` (None), ``sentence_ids`` (the BUCC ids, e.g.
        ``"de-000000123"``), ``is_decoy`` (bool) and ``DESCR``.

    Notes
    -----
    Gold pairs get pair_ids ``0 .. n_gold - 1`` in gold-file order (a sentence is
    linked by its first gold line; a later line naming it again is ignored).  Every
    other sentence is a decoy: it gets its own **negative** pair_id (``-1, -2, ...``)
    shared with no other row, and ``is_decoy`` is True.  So ``pair_ids >= 0`` marks
    the rows that have a translation.  Gold lines naming an unknown sentence id raise
    a ValueError.  Without a gold file (XTREME's hidden test gold) a warning is given
    and every sentence is a decoy.

    Examples
    --------
    >>> from posthoc_align.datasets import load_bucc
    >>> bucc = load_bucc("xtreme/download/bucc2018", "fr-en", split="dev")  # doctest: +SKIP
    >>> int((bucc.pair_ids >= 0).sum()) // 2  # number of gold pairs  # doctest: +SKIP
    """
    if not isinstance(pair, str) or not re.fullmatch(r"[a-z]{2,3}-[a-z]{2,3}", pair):
        raise ValueError(f"pair must look like 'de-en', got {pair!r}")
    a, b = pair.split("-")
    if "en" not in (a, b) or a == b:
        raise ValueError(f"BUCC pairs are '<src>-en' (de-en, fr-en, ru-en, zh-en), got {pair!r}")
    src = b if a == "en" else a
    if not isinstance(split, str) or not split or "/" in split:
        raise ValueError(f"split must be a name such as 'test' or 'dev', got {split!r}")
    root = _check_dir(path, "BUCC (<src>-en.<split>.<src>, .en, .gold)")
    stem = f"{src}-en.{split}"
    files = {k: root / f"{stem}.{k}" for k in (src, "en", "gold")}
    missing = [files[k].name for k in (src, "en") if not files[k].is_file()]
    if missing:
        have = sorted(
            {p.name.rsplit(".", 1)[0] for p in root.iterdir() if re.match(r"^\w+-en\.", p.name)}
        )
        raise FileNotFoundError(
            f"BUCC files missing in {root}: {', '.join(missing)}. Sets found there: "
            f"{', '.join(have) or 'none'} (pass pair='<src>-en' and split accordingly)."
        )
    src_ids, src_texts = _read_bucc_sentences(files[src])
    en_ids, en_texts = _read_bucc_sentences(files["en"])
    src_pos = {s: i for i, s in enumerate(src_ids)}
    en_pos = {s: i for i, s in enumerate(en_ids)}
    src_pair = np.full(len(src_ids), -1, dtype=np.int64)
    en_pair = np.full(len(en_ids), -1, dtype=np.int64)
    n_gold = 0
    gold_lines: list[str] = []
    if files["gold"].is_file():
        gold_lines = _read_lines(files["gold"])
    else:
        warnings.warn(
            f"{files['gold']} is missing (XTREME hides the test gold): every sentence is "
            "returned as a decoy, with no gold pairs.",
            stacklevel=2,
        )
    for lineno, line in enumerate(gold_lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(
                f"{files['gold']}:{lineno} is not a 'src_id<TAB>en_id' line: {line[:80]!r}"
            )
        s_id, e_id = parts[0].strip(), parts[1].strip()
        if s_id not in src_pos and e_id in src_pos and s_id in en_pos:
            s_id, e_id = e_id, s_id  # gold written en first
        if s_id not in src_pos or e_id not in en_pos:
            raise ValueError(
                f"{files['gold']}:{lineno} names sentence ids not in the {src}/en files: "
                f"{line[:80]!r}"
            )
        i, j = src_pos[s_id], en_pos[e_id]
        if src_pair[i] >= 0 or en_pair[j] >= 0:
            continue
        src_pair[i] = en_pair[j] = n_gold
        n_gold += 1
    pair_ids = np.concatenate([src_pair, en_pair])
    decoy = pair_ids < 0
    pair_ids[decoy] = -np.arange(1, int(decoy.sum()) + 1)
    descr = (
        f"BUCC {src}-en {split} set read from {root}: {len(src_ids)} {src} and {len(en_ids)} "
        f"en sentences, {n_gold} gold pairs (pair_ids 0..{n_gold - 1}); the other "
        f"{int(decoy.sum())} sentences are decoys with unique negative pair_ids "
        "(is_decoy=True)."
    )
    return make_bunch(
        src_texts + en_texts,
        [iso639_1(src)] * len(src_ids) + ["en"] * len(en_ids),
        pair_ids,
        None,
        descr,
        sentence_ids=np.asarray(src_ids + en_ids, dtype=str),
        is_decoy=decoy,
        n_gold=n_gold,
    )
