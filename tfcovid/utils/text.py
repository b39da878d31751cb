"""Untrusted text on its way out: file names and config values shown escaped and bounded, CSV
cells that a spreadsheet would run as a formula neutralised, names that are not UTF-8 found;
and counts in words (:func:`plural`).

Every file name, run name and config value comes from outside tfcovid; one function escapes
them all (:func:`escape`), wherever they are printed or written to a line-based file.
"""
from __future__ import annotations

import os
import reprlib

_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape(text: str) -> str:
    r"""``text`` on one line, unambiguously: backslash, tab, newline and carriage return become
    ``\\``, ``\t``, ``\n``, ``\r``; a byte that is not UTF-8 (a name read with Python's
    surrogateescape) ``\xNN``; every other unprintable character (controls, DEL, U+202E and
    the other bidirectional and zero-width marks, line separators) ``\uNNNN``. Printable text,
    in any script, is left as it is."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the raw byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        elif not ch.isprintable():
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def one_line(message: str) -> str:
    """A message of tfcovid's own that may quote a name (a link's target): left as it is when
    printable (its backslashes are its own), else escaped."""
    return message if message.isprintable() else escape(message)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6
_REPR.maxlevel = 3


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, the last one an ellipsis when it was longer."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def shown(value) -> str:
    """``value``'s repr for an error message, on one line and at most 80 characters: a config
    value may be megabytes (reprlib stops early instead of building it all). A str's repr
    already writes unprintable characters as escapes."""
    return clip(_REPR.repr(value))


def not_utf8(path) -> str | None:
    """The reason a path's name is refused, or None: names that are not valid UTF-8 cannot be
    written to the CSV, JSON and TensorFlow strings tfcovid makes (rename them)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return ("its name is not valid UTF-8 (the bytes that are not are shown as \\xNN); rename "
                "it, e.g. convmv -f latin1 -t utf8 --notest NAME")
    return None


# OWASP "CSV injection": a cell starting with one of these is a formula in Excel, LibreOffice
# and Google Sheets (=HYPERLINK(...), +cmd|...); a leading quote makes it text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(cell: str) -> str:
    """A text cell for a CSV a spreadsheet may open: ``'`` prepended when it starts a formula."""
    return "'" + cell if cell.startswith(FORMULA_START) else cell


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 epoch"``, ``"2 epochs"``, ``"0 epochs"``; ``many`` where adding an "s" is wrong."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"
