"""Sphinx configuration: the README as the guide, API pages generated from the docstrings.

Build (from the repository root, with the ``docs`` extra and the frameworks installed, since
autodoc imports every module)::

    sphinx-build -W -b html docs docs/_build/html

The API pages in ``docs/api/`` are written here, at configuration time, for every public module
of ``curvlinalg``, ``curvlinalg_torch`` and ``curvlinalg_jax`` found by ``pkgutil``: a module
added to a package gets its page without editing this file. ``docs/api/`` is generated (and
ignored by git).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import curvlinalg

DOCS = Path(__file__).resolve().parent
PACKAGES = {
    "curvlinalg": "Core (any array-API library)",
    "curvlinalg_torch": "PyTorch adapter",
    "curvlinalg_jax": "JAX adapter (optax, Flax)",
}

project = "curvlinalg"
author = "curvlinalg developers"
copyright = "curvlinalg developers, Apache-2.0"
release = version = curvlinalg.__version__

# The docstrings write their formulas in Unicode (``(A⊗G + λI)⁻¹``); ``:math:`` would still
# render through Sphinx's default MathJax.
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3  # README's "#section" links

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False

html_theme = "alabaster"
html_title = f"curvlinalg {release}"
html_theme_options = {"page_width": "1180px", "sidebar_width": "250px"}


def _drop_field_aliases(app, what, name, obj, options, lines) -> None:
    """NamedTuple fields carry the docstring 'Alias for field number N': noise on the page."""
    if lines and lines[0].startswith("Alias for field number"):
        lines.clear()


# A Markdown link to a repository file (not an image, not a URL, not an anchor).
_FILE_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\((?![a-z]+:|#)([^)\s]+)\)")


def _unlink_repository_files(app, relative_path, parent_docname, content) -> None:
    """README's links to other files of the repository (``bench/README.md``) are not pages
    of the documentation: show their path instead of a broken link."""

    def plain(link: re.Match) -> str:
        text, target = link[1], link[2]
        return f"`{target}`" if text.strip("`") == target else f"{text} (`{target}`)"

    content[0] = _FILE_LINK.sub(plain, content[0])


_ARGUMENT_SECTION = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$"
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _join_wrapped_names(app, what, name, obj, options, lines) -> None:
    """Join a Google-style entry whose list of names wraps onto the next line::

        momentum, weight_decay, ema_decay, update_every,
        inverse_every: as for FOOF.

    Napoleon reads each line as an entry of its own (docutils then warns); joined, the
    names form one entry. Runs before napoleon."""
    index, section_indent, entry_indent = 0, None, None
    while index < len(lines):
        line = lines[index]
        header = _ARGUMENT_SECTION.match(line)
        if header:
            section_indent, entry_indent = len(header[1]), None
        elif section_indent is not None and line.strip():
            if _indent(line) <= section_indent:
                section_indent = None
            else:
                entry_indent = _indent(line) if entry_indent is None else entry_indent
                following = lines[index + 1] if index + 1 < len(lines) else ""
                if (
                    _indent(line) == entry_indent
                    and ":" not in line
                    and line.rstrip().endswith(",")
                    and following.strip()
                    and _indent(following) == entry_indent
                ):
                    lines[index : index + 2] = [f"{line.rstrip()} {following.strip()}"]
                    continue
        index += 1


def setup(app) -> None:
    app.connect("autodoc-process-docstring", _drop_field_aliases)
    app.connect("autodoc-process-docstring", _join_wrapped_names, priority=100)
    app.connect("include-read", _unlink_repository_files)


def _title(text: str, underline: str) -> str:
    return f"{text}\n{underline * len(text)}\n\n"


def _public_submodules(package: str) -> list[str]:
    module = importlib.import_module(package)
    return sorted(
        f"{package}.{info.name}"
        for info in pkgutil.iter_modules(module.__path__)
        if not info.name.startswith("_")
    )


def _home(value: object) -> str:
    return "" if inspect.ismodule(value) else getattr(value, "__module__", None) or ""


def _is_private(module: str) -> bool:
    return any(part.startswith("_") for part in module.split("."))


def _directive(value: object) -> str | None:
    if inspect.isclass(value):
        return "autoclass"
    return "autofunction" if callable(value) else None


def _placement(module_name: str, claimed: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """What a page for ``module_name`` must leave out and what it must add.

    ``automodule :members:`` documents every name of ``__all__``, also one imported from
    elsewhere, which would describe the object twice (a warning). A name defined in another
    public module is excluded (its own page shows it); a name defined in a private module
    (``NotPositiveDefiniteError`` from ``curvlinalg._checks``) is shown on the first page
    that exports it (``claimed`` records which): by ``automodule`` on a module page, by the
    returned directives on a package page (which lists no members itself).
    """
    module = importlib.import_module(module_name)
    exclude, add = [], []
    for name in getattr(module, "__all__", []):
        value = getattr(module, name)
        home = _home(value)
        if not home or home == module_name:
            continue
        if _is_private(home) and f"{home}.{name}" not in claimed and _directive(value):
            claimed.add(f"{home}.{name}")
            add.append((_directive(value), f"{module_name}.{name}"))
        else:
            exclude.append(name)
    return exclude, add


def _write(path: Path, text: str) -> None:
    # Rewritten only when changed, so that incremental builds stay incremental.
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def _generate_api_pages() -> None:
    api = DOCS / "api"
    api.mkdir(exist_ok=True)
    wanted = {"index.rst"}
    claimed: set[str] = set()
    index = _title("API reference", "=")
    index += "Generated from the docstrings of every public module.\n\n"
    for package, title in PACKAGES.items():
        submodules = _public_submodules(package)
        for name in submodules:
            exclude, _ = _placement(name, claimed)  # what it adds, automodule shows
            page = _title(f"``{name}``", "=") + f".. automodule:: {name}\n"
            if exclude:
                page += f"   :exclude-members: {', '.join(exclude)}\n"
            _write(api / f"{name}.rst", page)
            wanted.add(f"{name}.rst")
        _, add = _placement(package, claimed)
        page = _title(f"``{package}``: {title}", "=")
        page += f".. automodule:: {package}\n   :no-members:\n\n"
        page += "".join(f".. {directive}:: {target}\n\n" for directive, target in add)
        page += ".. toctree::\n   :maxdepth: 1\n\n"
        page += "".join(f"   {name}\n" for name in submodules) + "\n"
        _write(api / f"{package}.rst", page)
        wanted.add(f"{package}.rst")
    index += ".. toctree::\n   :maxdepth: 2\n\n" + "".join(f"   {p}\n" for p in PACKAGES)
    _write(api / "index.rst", index)
    for stale in api.glob("*.rst"):  # a module that was removed or renamed
        if stale.name not in wanted:
            stale.unlink()


_generate_api_pages()
