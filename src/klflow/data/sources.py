"""What a source string names: a registered corpus, `hf:NAME`, or a local file or folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from klflow.data.corpus import Example, Source, SourceOptions, options_digest, path_source, slug
from klflow.data.hf import HF_PREFIX, hf_source
from klflow.data.registry import CORPORA
from klflow.errors import KLFlowError


@dataclass
class Corpus:
    """All examples of a source, read into memory; `replaced_chars` counts bytes turned into U+FFFD."""

    name: str
    examples: list[Example]
    replaced_chars: int
    pairs: bool = False
    separator: str = ""

    @property
    def documents(self) -> list[str]:
        """Each example's full text (for a pair: prompt, separator, response)."""
        return [e.text if e.prompt is None else e.prompt + self.separator + e.text for e in self.examples]


def open_source(source: str, options: SourceOptions | None = None, streaming: bool = False) -> Source:
    """The Source that `source` names; a registered corpus is fetched here on first use.

    A corpus name wins over a local path of the same name; write ./NAME for the path.
    """
    options = options or SourceOptions()
    if source in CORPORA:
        if options != SourceOptions():
            raise KLFlowError(f"{source} is a named corpus; field and Hugging Face options do not apply to it")
        return CORPORA[source].open()
    if source.startswith(HF_PREFIX):
        return hf_source(source[len(HF_PREFIX):], options, streaming)
    if options.hf_config is not None or options.hf_split != SourceOptions.hf_split:
        raise KLFlowError("--hf-config and --hf-split apply only to a Hugging Face dataset (--hf NAME)")
    return path_source(Path(source).expanduser(), options)


def source_slug(source: str, options: SourceOptions | None = None) -> str:
    """A folder-name part for `source`, computed without opening (or fetching) it."""
    options = options or SourceOptions()
    if source in CORPORA:
        return source
    if source.startswith(HF_PREFIX):
        return f"hf-{slug(source[len(HF_PREFIX):])}-{options_digest(source, options)}"
    path = Path(source).expanduser().resolve()
    # The hash keeps same-named files in different places (or read with other fields) apart.
    return f"{slug(path.name)}-{options_digest(str(path), options)}"


def load_corpus(source: str, options: SourceOptions | None = None) -> Corpus:
    """Read every example of `source` into memory, warning about what had to be repaired."""
    opened = open_source(source, options)
    examples = list(opened.examples())
    opened.warn()
    if not examples:
        raise KLFlowError(f"corpus {opened.name} is empty")
    return Corpus(opened.name, examples, opened.stats.replaced_chars, opened.pairs, opened.separator)
