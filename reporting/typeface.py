"""Fonts for the PDF and the Secondary Capture text band: every patient name must render.

The bundled DejaVu Sans subset covers Latin, Greek and Cyrillic; characters outside it (Arabic, Hebrew, Thai,
Devanagari, CJK, Hangul, ...) are drawn with the first installed system fallback font that has them, so such a
name is not printed as empty boxes. A PDF draws glyphs left to right as given: right-to-left text is put in
the order it is seen and Arabic letters in their joined forms first (:func:`visual`).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from arabic_reshaper import reshape
from bidi import get_display
from reportlab.lib.fonts import addMapping
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont

LOGGER = logging.getLogger(__name__)

FONT_DIR = Path(__file__).resolve().parent / "fonts"
REGULAR_FILE = FONT_DIR / "DejaVuSans.ttf"
BOLD_FILE = FONT_DIR / "DejaVuSans-Bold.ttf"
# TrueType fonts (reportlab cannot embed CFF-flavoured OpenType such as Noto CJK) with wide coverage. Arabic,
# Hebrew, Thai and Devanagari names printed as boxes before these (review).
_NOTO = Path("/usr/share/fonts/truetype/noto")  # Debian fonts-noto-core
FALLBACK_CANDIDATES = (
    *(_NOTO / f"NotoSans{script}-Regular.ttf" for script in (
        "Arabic", "Hebrew", "Thai", "Devanagari", "Bengali", "Tamil", "Armenian", "Georgian", "Ethiopic"
    )),
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),  # Debian fonts-dejavu-core: the whole of DejaVu
    Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"),  # Debian fonts-droid-fallback
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),  # Debian fonts-wqy-microhei
    Path("/usr/share/fonts/truetype/arphic/uming.ttc"),  # Debian fonts-arphic-uming
)

REGULAR = "CXRSans"
BOLD = "CXRSans-Bold"
FALLBACK = "CXRFallback"


@dataclass(frozen=True)
class Typeface:
    """Registered reportlab font names and the code points each covers."""

    regular: str
    bold: str
    covered: frozenset[int]
    fallbacks: tuple[tuple[str, frozenset[int]], ...]  # (font name, code points), in order of preference

    def _font_for(self, char: str, font: str) -> str:
        if ord(char) in self.covered:
            return font
        return next((name for name, points in self.fallbacks if ord(char) in points), font)

    def runs(self, text: str, font: str) -> list[tuple[str, str]]:
        """``text`` (in :func:`visual` order) cut into (font name, text) runs: ``font`` where it has the
        glyphs, else the first fallback font that has them (Droid Sans Fallback has no Hangul; WenQuanYi
        Micro Hei has)."""
        result: list[tuple[str, str]] = []
        for char in visual(text):
            wanted = self._font_for(char, font)
            if result and result[-1][0] == wanted:
                result[-1] = (wanted, result[-1][1] + char)
            else:
                result.append((wanted, char))
        return result

    def markup(self, text: str) -> str:
        """``text`` escaped for a reportlab Paragraph, runs the main font lacks switched to a fallback."""
        return "".join(
            f'<font name="{name}">{escape(run)}</font>' if name != self.regular else escape(run)
            for name, run in self.runs(text, self.regular)
        )


# Hebrew, Arabic, Syriac, Thaana, NKo, Samaritan, Mandaic and their presentation forms
_RIGHT_TO_LEFT = re.compile("[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc]")


def visual(text: str) -> str:
    """``text`` as a PDF must draw it, left to right: with right-to-left letters (Arabic, Hebrew), its
    Arabic letters in their joined forms (arabic-reshaper) and the whole reordered by the Unicode
    bidirectional algorithm (python-bidi; "כהן, שרה" is drawn "הרש ,ןהכ"); other text as it is. The text
    layer then holds the text in that order too. Indic conjuncts are not shaped (reportlab shapes only
    with uharfbuzz and its own bidi package): a Devanagari name's letters are all there, but a vowel sign
    drawn before its consonant (ि) follows it."""
    if not _RIGHT_TO_LEFT.search(text):
        return text
    return str(get_display(reshape(text)))


def _codepoints(font: TTFont) -> frozenset[int]:
    return frozenset(font.face.charToGlyph)


@functools.cache
def typeface() -> Typeface:
    """Register the fonts with reportlab (once per process) and describe them."""
    regular = TTFont(REGULAR, str(REGULAR_FILE))
    bold = TTFont(BOLD, str(BOLD_FILE))
    pdfmetrics.registerFont(regular)
    pdfmetrics.registerFont(bold)
    for bold_flag, italic_flag, name in ((0, 0, REGULAR), (1, 0, BOLD), (0, 1, REGULAR), (1, 1, BOLD)):
        addMapping(REGULAR, bold_flag, italic_flag, name)
    fallbacks: list[tuple[str, frozenset[int]]] = []
    for index, path in enumerate(fallback_font_files()):
        name = f"{FALLBACK}{index or ''}"
        fallback = TTFont(name, str(path), subfontIndex=0)
        pdfmetrics.registerFont(fallback)
        fallbacks.append((name, _codepoints(fallback)))
    if not fallbacks:
        LOGGER.info("no fallback font for scripts beyond Latin/Greek/Cyrillic; such names render as boxes")
    return Typeface(REGULAR, BOLD, _codepoints(regular), tuple(fallbacks))


def fallback_font_files() -> list[Path]:
    """The installed fallback fonts, in order of preference."""
    return [path for path in FALLBACK_CANDIDATES if path.is_file()]


def fallback_font_file() -> Path | None:
    """The first installed fallback font, or ``None``."""
    return next(iter(fallback_font_files()), None)
