"""Parallel text from installed gettext message catalogs (``.mo`` files).

Free software ships its user interface strings translated into many languages, as
``<localedir>/<lang>/LC_MESSAGES/<domain>.mo``.  The English source string (the
``msgid``) aligns all translations of one message.  The binary ``.mo`` format is read
directly (some catalog headers trip Python's :mod:`gettext`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch

from ._bunch import as_language_tuple, make_bunch

__all__ = ["list_gettext_languages", "load_gettext", "read_mo"]

_MAGIC_LE = b"\xde\x12\x04\x95"  # 0x950412de written little-endian
_MAGIC_BE = b"\x95\x04\x12\xde"


def read_mo(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a compiled gettext catalog into ``{msgid: translation}``.

    The header entry (empty msgid) is skipped.  A message with a context is keyed
    ``"context\\x04msgid"``; a plural message is keyed by its full
    ``"singular\\x00plural"`` msgid and its translation is the first plural form.
    Entries with an empty translation are skipped.

    Parameters
    ----------
    path : path-like
        A ``.mo`` file, either byte order.

    Returns
    -------
    dict of str to str

    Raises
    ------
    ValueError
        If the file is not a valid ``.mo`` catalog.

    Examples
    --------
    >>> read_mo("/usr/share/locale/fr/LC_MESSAGES/gtk20-properties.mo")  # doctest: +SKIP
    {'Accel Closure': 'Fermeture de raccourci', ...}
    """
    raw = Path(path).read_bytes()
    magic = raw[:4]
    if magic == _MAGIC_LE:
        end = "<"
    elif magic == _MAGIC_BE:
        end = ">"
    else:
        raise ValueError(f"{path} is not a gettext .mo file (bad magic number {magic!r})")
    try:
        revision, n, orig_off, trans_off = struct.unpack_from(end + "4I", raw, 4)
    except struct.error:
        raise ValueError(f"{path} is truncated: no complete .mo header") from None
    if revision >> 16 > 1:
        raise ValueError(f"{path}: unsupported .mo major revision {revision >> 16}")
    size = len(raw)
    if orig_off + 8 * n > size or trans_off + 8 * n > size:
        raise ValueError(f"{path} is truncated or corrupt: string tables run past the end")
    origs = struct.unpack_from(end + f"{2 * n}I", raw, orig_off)
    trans = struct.unpack_from(end + f"{2 * n}I", raw, trans_off)
    out: dict[str, str] = {}
    for i in range(n):
        olen, ooff = origs[2 * i], origs[2 * i + 1]
        tlen, toff = trans[2 * i], trans[2 * i + 1]
        if ooff + olen > size or toff + tlen > size:
            raise ValueError(f"{path} is corrupt: entry {i} points past the end of the file")
        if olen == 0:  # header entry
            continue
        try:
            msgid = raw[ooff : ooff + olen].decode("utf-8")
            msgstr = raw[toff : toff + tlen].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"{path}: entry {i} is not UTF-8; only UTF-8 catalogs are supported"
            ) from None
        first = msgstr.split("\x00", 1)[0]
        if first:
            out[msgid] = first
    return out


def _english(msgid: str) -> str:
    """English text of a msgid key: context dropped, singular form of a plural."""
    return msgid.split("\x04", 1)[-1].split("\x00", 1)[0]


def _catalog_path(localedir: Path, lang: str, domain: str) -> Path:
    return localedir / lang / "LC_MESSAGES" / f"{domain}.mo"


def list_gettext_languages(
    domain: str = "gtk20-properties", localedir: str | os.PathLike[str] = "/usr/share/locale"
) -> list[str]:
    """Languages (locale folder names) that have a catalog for ``domain``.

    Examples
    --------
    >>> "fr" in list_gettext_languages("gtk20-properties")  # doctest: +SKIP
    True
    """
    root = Path(localedir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _catalog_path(root, p.name, domain).is_file())


def _list_domains(root: Path, limit: int = 40) -> str:
    domains: set[str] = set()
    for sub in root.glob("*/LC_MESSAGES/*.mo"):
        domains.add(sub.stem)
    if not domains:
        return "none"
    names = sorted(domains)
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_gettext(
    domain: str = "gtk20-properties",
    languages: str | Iterable[str] = ("fr", "de"),
    localedir: str | os.PathLike[str] = "/usr/share/locale",
    include_english: bool = True,
) -> Bunch:
    """Load user-interface messages aligned by their English source string.

    Parameters
    ----------
    domain : str, default="gtk20-properties"
        Catalog name: ``<localedir>/<lang>/LC_MESSAGES/<domain>.mo``.  Debian ships e.g.
        ``gtk20-properties`` (short GTK property descriptions, ~100 languages), ``glib20``
        and ``iso_3166-1`` (country names).
    languages : str or sequence of str, default=("fr", "de")
        Locale folder names (``"fr"``, ``"pt_BR"``, ``"sr@latin"``, ...).
    localedir : path-like, default="/usr/share/locale"
        Root of the locale tree.
    include_english : bool, default=True
        Add the msgids themselves as rows of language ``"en"`` (first).

    Returns
    -------
    bunch : sklearn.utils.Bunch
        ``data``, ``languages``, ``pair_ids`` (int: index of the msgid in the sorted
        list of msgids translated in every requested language), ``target`` (None),
        ``msgids`` (the sorted common msgids, context as ``ctx\\x04id``) and ``DESCR``.
        Rows are language-major (``"en"`` first when included), ordered by pair_id.

    Notes
    -----
    Only messages translated (non-empty) in all requested languages are kept.  Plural
    messages contribute their singular msgid and first translated form; a message with
    a context gives the English text without the context.  Translations identical to
    the English text are kept.

    Examples
    --------
    >>> from posthoc_align.datasets import load_gettext
    >>> msgs = load_gettext("gtk20-properties", ("fr", "de"))  # doctest: +SKIP
    >>> sorted(set(msgs.languages))  # doctest: +SKIP
    ['de', 'en', 'fr']
    """
    langs = as_language_tuple(languages)
    if not isinstance(domain, str) or not domain or "/" in domain:
        raise ValueError(
            f"domain must be a catalog name such as 'gtk20-properties', got {domain!r}"
        )
    root = Path(localedir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"localedir {root} is not a folder; pass the root of a locale tree "
            "(<localedir>/<lang>/LC_MESSAGES/<domain>.mo), e.g. /usr/share/locale"
        )
    if include_english and "en" in langs:
        raise ValueError(
            "'en' is added from the msgids by include_english=True; remove 'en' from "
            "languages, or pass include_english=False to read an 'en' catalog instead"
        )
    available = list_gettext_languages(domain, root)
    if not available:
        raise FileNotFoundError(
            f"No catalog for domain {domain!r} under {root}. Domains found there: "
            f"{_list_domains(root)}."
        )
    missing = [lang for lang in langs if lang not in available]
    if missing:
        raise ValueError(
            f"No {domain!r} catalog for {missing} under {root}. Languages with this "
            f"domain: {', '.join(available)}."
        )
    catalogs = {lang: read_mo(_catalog_path(root, lang, domain)) for lang in langs}
    common = set.intersection(*(set(c) for c in catalogs.values()))
    msgids = sorted(common)

    data: list[str] = []
    row_langs: list[str] = []
    pair_ids: list[int] = []
    ids = list(range(len(msgids)))
    if include_english:
        data.extend(_english(m) for m in msgids)
        row_langs.extend(["en"] * len(msgids))
        pair_ids.extend(ids)
    for lang in langs:
        cat = catalogs[lang]
        data.extend(cat[m] for m in msgids)
        row_langs.extend([lang] * len(msgids))
        pair_ids.extend(ids)
    shown = (["en"] if include_english else []) + list(langs)
    descr = (
        f"gettext catalog {domain!r} read from {root}: {len(msgids)} messages translated in "
        f"all of {', '.join(langs)}; languages {', '.join(shown)}. pair_ids index the "
        "sorted common msgids; 'en' rows are the msgids themselves."
    )
    return make_bunch(
        data,
        row_langs,
        np.asarray(pair_ids, dtype=np.int64),
        None,
        descr,
        msgids=msgids,
        domain=domain,
    )
