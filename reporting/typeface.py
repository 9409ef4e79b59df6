"""Fonts for the PDF and the Secondary Capture text band: every patient name must render.

The bundled DejaVu Sans subset covers Latin, Greek and Cyrillic; characters outside it (CJK, ...) are drawn
with the first system fallback font found, so a Japanese name is not printed as empty boxes.
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
    fallback: str | None
    covered: frozenset[int]
    fallback_covered: frozenset[int]

    def runs(self, text: str, font: str) -> list[tuple[str, str]]:
        """``text`` cut into (font name, text) runs: ``font`` where it has the glyphs, else the fallback."""
        result: list[tuple[str, str]] = []
        for char in text:
            wanted = font
            if (
                self.fallback is not None
                and ord(char) not in self.covered
                and ord(char) in self.fallback_covered
            ):
                wanted = self.fallback
            if result and result[-1][0] == wanted:
                result[-1] = (wanted, result[-1][1] + char)
            else:
                result.append((wanted, char))
        return result

    def markup(self, text: str) -> str:
        """``text`` escaped for a reportlab Paragraph, runs the main font lacks switched to the fallback."""
        return "".join(
            f'<font name="{name}">{escape(run)}</font>' if name == self.fallback else escape(run)
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
    fallback_name: str | None = None
    fallback_covered: frozenset[int] = frozenset()
    path = fallback_font_file()
    if path is not None:
        fallback = TTFont(FALLBACK, str(path), subfontIndex=0)
        pdfmetrics.registerFont(fallback)
        fallback_name = FALLBACK
        fallback_covered = _codepoints(fallback)
    else:
        LOGGER.info("no fallback font for scripts beyond Latin/Greek/Cyrillic; such names render as boxes")
    return Typeface(REGULAR, BOLD, fallback_name, _codepoints(regular), fallback_covered)


def fallback_font_file() -> Path | None:
    """The first installed fallback font, or ``None``."""
    return next((path for path in FALLBACK_CANDIDATES if path.is_file()), None)
