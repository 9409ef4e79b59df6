"""Names as the console's search compares them: case and Latin accents folded, the same on every database.

A radiologist at an English keyboard types "muller" for MÜLLER^JÖRG and "soren" for Søren. SQL cannot
do that portably (PostgreSQL needs the unaccent extension, SQLite has nothing), so the patient row keeps
its name folded here (``patient.name_folded``) and the search folds its words the same way.
"""

from __future__ import annotations

import re
import unicodedata

# str.lower() may lengthen a value ("İ" becomes "i̇"): a folded identifier column is twice its value's length.
IDENTIFIER_GROWTH = 2

# Letters that carry their mark in the letter itself (no decomposition): what a keyboard without them types.
_UNDECOMPOSED = str.maketrans({
    "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ł": "l", "Ł": "L",
    "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ı": "i",
})


#: The other ways an apostrophe and a hyphen are written (a name pasted from a letter, typed on a phone, or
#: sent by a RIS in UTF-8), folded to the ASCII mark a keyboard types. The acute accent too: alone, NFKD
#: makes it a blank and a combining accent, and "O´BRIEN" fell apart into "o" and "brien".
APOSTROPHES = "\u2019\u2018\u201b\u02bc\u02bb\u02b9\u0060\u00b4\u2032"
HYPHENS = "\u2010\u2011\u2012\u2013\u2014\u2212"
_MARKS = str.maketrans({**dict.fromkeys(APOSTROPHES, "'"), **dict.fromkeys(HYPHENS, "-")})


def _is_accent(char: str) -> bool:
    """A combining diacritic of the Latin, Greek and Cyrillic scripts (U+0300-U+036F). The voicing marks
    of kana (U+3099, U+309A) and the like stay: が and か are different names."""
    return "\u0300" <= char <= "\u036f"


def fold(text: str) -> str:
    """``text`` without case and Latin accents: "MÜLLER^Jörg" → "muller^jorg", "Søren" → "soren",
    "Straße" → "strasse", "O’Brien" → "o'brien". Compatibility forms become their plain letters
    (full-width "ＭＵＬ" → "mul"); Hangul syllables and kana keep their form."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_MARKS))
    plain = "".join(char for char in decomposed if not _is_accent(char))
    return unicodedata.normalize("NFC", plain).translate(_UNDECOMPOSED).casefold()


def identifier(text: str) -> str:
    """A Patient ID or accession number as the search compares it: lower case only, as Python lower-cases
    (``lower()`` on SQLite is that function, dicom_node.store.db); accents stay, an ID's letters are its
    identity. Kept in ``patient.patient_id_folded`` and ``study.accession_number_folded`` so that a prefix
    search reads their index instead of lower-casing every row."""
    return text.lower()


#: What separates the words of a name, in the search box as in the name: blanks, commas, DICOM's "^"
#: between a name's components and "=" between its alphabetic, ideographic and phonetic groups.
WORD_SEPARATORS = re.compile(r"[\s,^=]+")

# A mark inside a word after which a word starts too: "o'brien" is also found by "brien", "smith-jones"
# by "jones" (the search matches words from their start, from an index).
_INNER_MARK = re.compile(r"\W")


def name_words(folded: str) -> set[str]:
    """The words of a folded name (:func:`fold`) as the search by name matches them from their start:
    each word, and each tail of a word after a punctuation mark inside it. "o'brien^sean" gives
    {"o'brien", "brien", "sean"}."""
    words: set[str] = set()
    for word in WORD_SEPARATORS.split(folded):
        if not word:
            continue
        words.add(word)
        for mark in _INNER_MARK.finditer(word):
            tail = word[mark.end():]
            if tail:
                words.add(tail)
    return words
