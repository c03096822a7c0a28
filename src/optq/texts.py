"""Offline text every machine has, split once into what calibration may use and what the report holds out.

- pydoc topics (`pydoc_data.topics`): every 4th topic (name order) is held out for the report's `docs` domain.
- Python source of the standard library: the top-level modules are the report's `code` domain; the modules
  inside its packages (tests excluded) are calibration text.
- Django's translation catalogs (BSD-3-Clause; `pip install django`): French, German and Spanish are the
  report's `multilingual` domain; Italian, Brazilian Portuguese and Dutch are calibration text (regional
  variants of the report's languages, such as es_AR, are used by neither).
"""

from __future__ import annotations

import gettext
import importlib.util
import sys
import sysconfig
from pathlib import Path

from .errors import OptqError

PYDOC_HELD_OUT_EVERY = 4
REPORT_LANGUAGES = ("fr", "de", "es")
CALIBRATION_LANGUAGES = ("it", "pt_BR", "nl")
_NOT_LIBRARY = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def pydoc_documents(held_out: bool = False) -> list[str]:
    """The pydoc topics used for calibration, or (held_out) the ones kept out of it for evaluation."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return [topics[k].strip() for i, k in enumerate(names) if (i % PYDOC_HELD_OUT_EVERY == 3) == held_out]


def _stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_code(max_chars: int, held_out: bool = True) -> tuple[str, str]:
    """(text, source) of standard-library Python source spanning the library, up to about `max_chars`:
    the top-level modules (held_out: the report's), or the modules inside packages (calibration's). Files
    are taken every k-th in name order so that the sample spans the library, then the rest in order."""
    folder = _stdlib_folder()
    if held_out:
        files = sorted(p for p in folder.glob("*.py") if p.is_file())
    else:
        files = sorted(p for p in folder.rglob("*.py") if p.parent != folder and p.is_file()
                       and not _NOT_LIBRARY & set(p.relative_to(folder).parts))
    if not files:
        raise OptqError(f"no Python source files in {folder} (a Python without its library sources): "
                        + ("drop 'code' from --domains" if held_out else "pass --dataset"))
    step = max(1, len(files) // 60)
    parts, seen, total = [], set(), 0
    for p in files[::step] + files:
        if total >= max_chars:
            break
        if p in seen:
            continue
        seen.add(p)
        parts.append(p)
        total += p.stat().st_size
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in parts)
    kind = "top-level modules" if held_out else "package modules"
    return text, f"Python {sys.version.split()[0]} standard library, {len(parts)} {kind} of {folder}"


def django_available() -> bool:
    return importlib.util.find_spec("django") is not None


def django_catalog(lang: str) -> list[str]:
    """The translated messages of every Django .mo catalog for `lang`, in a fixed order."""
    spec = importlib.util.find_spec("django")
    if spec is None or not spec.submodule_search_locations:
        raise OptqError("domain 'multilingual' needs Django's translation catalogs: pip install django "
                        "(or drop 'multilingual' from --domains)")
    root = Path(next(iter(spec.submodule_search_locations)))
    messages = []
    for mo in sorted(root.rglob(f"locale/{lang}/LC_MESSAGES/*.mo")):
        with mo.open("rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog  # msgid -> msgstr; the stdlib's own .mo reader
        for key in sorted(catalog, key=str):
            value = catalog[key]
            if key != "" and isinstance(value, str) and value.strip():
                messages.append(value.strip())
    if not messages:
        raise OptqError(f"Django at {root} has no '{lang}' translation catalogs")
    return messages
