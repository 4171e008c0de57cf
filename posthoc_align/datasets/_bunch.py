"""Shared helpers for the dataset loaders (private)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sklearn.utils import Bunch

__all__ = [
    "ISO639_3_TO_1",
    "as_language_tuple",
    "iso639_1",
    "make_bunch",
    "normalize_space",
]

# ISO 639-3 (and ISO 639-2/B) codes -> ISO 639-1, for the languages that FreeDict,
# Tatoeba (XTREME) and BUCC use.  Codes missing here are kept as they are.
ISO639_3_TO_1: dict[str, str] = {
    "afr": "af",
    "amh": "am",
    "ara": "ar",
    "aze": "az",
    "bel": "be",
    "ben": "bn",
    "bos": "bs",
    "bre": "br",
    "bul": "bg",
    "cat": "ca",
    "ces": "cs",
    "cym": "cy",
    "dan": "da",
    "deu": "de",
    "ell": "el",
    "eng": "en",
    "epo": "eo",
    "est": "et",
    "eus": "eu",
    "fas": "fa",
    "fin": "fi",
    "fra": "fr",
    "gla": "gd",
    "gle": "ga",
    "glg": "gl",
    "heb": "he",
    "hin": "hi",
    "hrv": "hr",
    "hun": "hu",
    "hye": "hy",
    "ido": "io",
    "ina": "ia",
    "ind": "id",
    "isl": "is",
    "ita": "it",
    "jav": "jv",
    "jpn": "ja",
    "kat": "ka",
    "kaz": "kk",
    "khm": "km",
    "kor": "ko",
    "kur": "ku",
    "lat": "la",
    "lav": "lv",
    "lit": "lt",
    "mal": "ml",
    "mar": "mr",
    "mkd": "mk",
    "mon": "mn",
    "msa": "ms",
    "nld": "nl",
    "nno": "nn",
    "nob": "nb",
    "nor": "no",
    "oci": "oc",
    "pes": "fa",
    "pol": "pl",
    "por": "pt",
    "ron": "ro",
    "rus": "ru",
    "slk": "sk",
    "slv": "sl",
    "spa": "es",
    "sqi": "sq",
    "srp": "sr",
    "swa": "sw",
    "swe": "sv",
    "swh": "sw",
    "tam": "ta",
    "tat": "tt",
    "tel": "te",
    "tgl": "tl",
    "tha": "th",
    "tuk": "tk",
    "tur": "tr",
    "uig": "ug",
    "ukr": "uk",
    "urd": "ur",
    "uzb": "uz",
    "vie": "vi",
    "yid": "yi",
    "zho": "zh",
    "cmn": "zh",
    "zsm": "ms",
}


def iso639_1(code: str) -> str:
    """Map an ISO 639-3 code to ISO 639-1 where one exists, else return it unchanged."""
    return ISO639_3_TO_1.get(code.lower(), code.lower())


def as_language_tuple(
    languages: str | Iterable[str], *, name: str = "languages"
) -> tuple[str, ...]:
    """Accept one language code or an iterable of codes; reject empties and duplicates."""
    if isinstance(languages, str):
        langs: tuple[str, ...] = (languages,)
    else:
        try:
            langs = tuple(languages)
        except TypeError:
            raise TypeError(
                f"{name} must be a language code or a sequence of codes, got {languages!r}"
            ) from None
    if not langs:
        raise ValueError(f"{name} is empty: give at least one language code, e.g. ('en', 'fr')")
    for lang in langs:
        if not isinstance(lang, str) or not lang:
            raise ValueError(f"{name} must hold non-empty strings, got {lang!r}")
    dup = sorted({x for x in langs if langs.count(x) > 1})
    if dup:
        raise ValueError(f"{name} lists {dup} more than once; give each language once")
    return langs


def normalize_space(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def make_bunch(
    data: Sequence[str],
    languages: Sequence[str],
    pair_ids: Sequence[Any] | np.ndarray,
    target: Sequence[int] | np.ndarray | None,
    descr: str,
    **extras: Any,
) -> Bunch:
    """Build the common return value of all loaders, checking that rows line up."""
    n = len(data)
    languages_arr = np.asarray(languages, dtype=str) if n else np.empty(0, dtype=str)
    pair_arr = np.asarray(pair_ids)
    if len(languages_arr) != n or len(pair_arr) != n:
        raise AssertionError("internal error: data, languages and pair_ids differ in length")
    target_arr = None if target is None else np.asarray(target)
    if target_arr is not None and len(target_arr) != n:
        raise AssertionError("internal error: target and data differ in length")
    return Bunch(
        data=list(data),
        languages=languages_arr,
        pair_ids=pair_arr,
        target=target_arr,
        DESCR=descr,
        **extras,
    )
