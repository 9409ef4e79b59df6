"""Names as the console's search compares them: case and Latin accents folded, the same on every database.

A radiologist at an English keyboard types "muller" for MÜLLER^JÖRG and "soren" for Søren. SQL cannot
do that portably (PostgreSQL needs the unaccent extension, SQLite has nothing), so the patient row keeps
its name folded here (``patient.name_folded``) and the search folds its words the same way.
"""

from __future__ import annotations

import unicodedata

# str.lower() may lengthen a value ("İ" becomes "i̇"): a folded identifier column is twice its value's length.
IDENTIFIER_GROWTH = 2

# Letters that carry their mark in the letter itself (no decomposition): what a keyboard without them types.
_UNDECOMPOSED = str.maketrans({
    "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ł": "l", "Ł": "L",
    "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ı": "i",
})


def _is_accent(char: str) -> bool:
    """A combining diacritic of the Latin, Greek and Cyrillic scripts (U+0300-U+036F). The voicing marks
    of kana (U+3099, U+309A) and the like stay: が and か are different names."""
    return "\u0300" <= char <= "\u036f"


def fold(text: str) -> str:
    """``text`` without case and Latin accents: "MÜLLER^Jörg" → "muller^jorg", "Søren" → "soren",
    "Straße" → "strasse". Compatibility forms become their plain letters (full-width "ＭＵＬ" → "mul");
    Hangul syllables and kana keep their form."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(char for char in decomposed if not _is_accent(char))
    return unicodedata.normalize("NFC", plain).translate(_UNDECOMPOSED).casefold()


def identifier(text: str) -> str:
    """A Patient ID or accession number as the search compares it: lower case only, as Python lower-cases
    (``lower()`` on SQLite is that function, dicom_node.store.db); accents stay, an ID's letters are its
    identity. Kept in ``patient.patient_id_folded`` and ``study.accession_number_folded`` so that a prefix
    search reads their index instead of lower-casing every row."""
    return text.lower()
