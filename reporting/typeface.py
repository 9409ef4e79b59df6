"""Fonts for the PDF and the Secondary Capture text band: every patient name must render.

The bundled DejaVu Sans subset covers Latin, Greek and Cyrillic; characters outside it (CJK, Hangul, ...) are
drawn with the first installed system fallback font that has them, so a Japanese or Korean name is not printed
as empty boxes.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from reportlab.lib.fonts import addMapping
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont

LOGGER = logging.getLogger(__name__)

FONT_DIR = Path(__file__).resolve().parent / "fonts"
REGULAR_FILE = FONT_DIR / "DejaVuSans.ttf"
BOLD_FILE = FONT_DIR / "DejaVuSans-Bold.ttf"
# TrueType fonts (reportlab cannot embed CFF-flavoured OpenType such as Noto CJK) with wide coverage.
FALLBACK_CANDIDATES = (
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
        """``text`` cut into (font name, text) runs: ``font`` where it has the glyphs, else the first
        fallback font that has them (Droid Sans Fallback has no Hangul; WenQuanYi Micro Hei has)."""
        result: list[tuple[str, str]] = []
        for char in text:
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
