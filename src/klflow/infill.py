"""Text with holes <-> a row of token ids with its cond_mask, and the filled text back.

Hole markers in a text:

- `<|hole:N|>` anywhere: N positions (N >= 1) to generate at that place.
- a line holding only `<|hole-line:N|>` (after optional indentation): a whole line generated into a
  slot of N positions. The indentation before the marker is given; the marker's own newline
  belongs to the hole. This is the line slot a model trained with `data.unit = "lines"` and
  `data.line_slot = N` fills: the line's tokens, then end-of-text filler.

The given text between markers is tokenized piece by piece and clamped. A hole's text is what
was generated up to its first end-of-text or padding token (the filler a model writes after what
it means); a line hole's text is further cut after its first newline, and ends with one. Given
pieces come back verbatim, so a text without holes comes back unchanged.

A row is the template's tokens, then (when room is left) end-of-text and padding, all given, as
the training rows end; `continuation` makes a prompt whose reply fills the rest of the window.
Everything here is pure: no model, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from klflow.errors import KLFlowError

_MARKER = re.compile(r"<\|hole(-line)?:(\d+)\|>")
_LOOSE = re.compile(r"<\|hole[^>]*>?")  # anything that starts like a marker, for the error message


class Tokenizer(Protocol):
    eot_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Given:
    """A clamped piece: its text (returned verbatim) and its token ids."""

    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Hole:
    """`size` positions to generate; a line hole holds one whole line (see the module docstring)."""

    size: int
    line: bool = False


@dataclass(frozen=True)
class Template:
    """Given pieces and holes in order."""

    pieces: tuple[Given | Hole, ...]

    @property
    def length(self) -> int:
        """Positions the pieces take: given tokens plus hole sizes."""
        return sum(len(p.ids) if isinstance(p, Given) else p.size for p in self.pieces)

    @property
    def holes(self) -> list[Hole]:
        return [p for p in self.pieces if isinstance(p, Hole)]

    def row(self, seq_len: int, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [seq_len], cond_mask [seq_len]): the pieces, then end-of-text and padding, given.

        Hole positions hold padding in ids; they are what a sampler generates.
        """
        if self.length > seq_len:
            hole_sizes = sum(hole.size for hole in self.holes)
            raise KLFlowError(f"the text is {self.length} tokens with its holes ({hole_sizes} to generate); "
                              f"the model's window is {seq_len} tokens")
        ids, given = [], []
        for piece in self.pieces:
            if isinstance(piece, Given):
                ids += piece.ids
                given += [True] * len(piece.ids)
            else:
                ids += [tokenizer.pad_id] * piece.size
                given += [False] * piece.size
        tail = seq_len - len(ids)
        ids += ([tokenizer.eot_id] + [tokenizer.pad_id] * (tail - 1)) if tail else []
        given += [True] * tail
        return torch.tensor(ids, dtype=torch.long), torch.tensor(given, dtype=torch.bool)

    def fills(self, ids: Sequence[int], tokenizer: Tokenizer) -> list[str]:
        """Each hole's text, read from a generated row `ids` (see the module docstring)."""
        ids = [int(i) for i in ids]
        texts, position = [], 0
        for piece in self.pieces:
            if isinstance(piece, Given):
                position += len(piece.ids)
                continue
            slot = ids[position : position + piece.size]
            position += piece.size
            ends = [i for i, token in enumerate(slot) if token in (tokenizer.eot_id, tokenizer.pad_id)]
            text = tokenizer.decode(slot[: ends[0]] if ends else slot)
            if piece.line:
                text = text.split("\n", 1)[0] + "\n"
            texts.append(text)
        return texts

    def render(self, ids: Sequence[int], tokenizer: Tokenizer) -> str:
        """The text with every hole filled from the generated row `ids`."""
        fills = iter(self.fills(ids, tokenizer))
        return "".join(p.text if isinstance(p, Given) else next(fills) for p in self.pieces)


def parse(text: str, tokenizer: Tokenizer) -> Template:
    """The template of a text with hole markers (see the module docstring)."""
    pieces: list[Given | Hole] = []
    cursor = 0
    for match in _MARKER.finditer(text):
        line, size = match.group(1) is not None, int(match.group(2))
        where = f"hole marker {match.group(0)!r} at character {match.start()}"
        if size < 1:
            raise KLFlowError(f"{where}: a hole needs at least 1 position")
        end = match.end()
        if line:
            line_start = text.rfind("\n", 0, match.start()) + 1
            line_end = text.find("\n", end)
            line_end = len(text) if line_end < 0 else line_end
            if text[line_start : match.start()].strip() or text[end:line_end].strip():
                raise KLFlowError(f"{where}: a line hole must be alone on its line (indentation before it is allowed)")
            end = min(line_end + 1, len(text))  # the marker's newline belongs to the hole
        _add_given(pieces, text[cursor : match.start()], tokenizer)
        pieces.append(Hole(size, line))
        cursor = end
    _add_given(pieces, text[cursor:], tokenizer)
    return Template(tuple(pieces))


def continuation(prompt: str | Sequence[int], tokenizer: Tokenizer, seq_len: int) -> Template:
    """A prompt (text or token ids) followed by one hole over the rest of the window: its reply."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
    if len(ids) >= seq_len:
        raise KLFlowError(f"the prompt is {len(ids)} tokens; it must be shorter than the sequence length {seq_len}")
    return Template((Given(text, tuple(ids)), Hole(seq_len - len(ids))))


def _add_given(pieces: list[Given | Hole], text: str, tokenizer: Tokenizer) -> None:
    stray = _LOOSE.search(text)
    if stray:
        raise KLFlowError(f"malformed hole marker {stray.group(0)!r}: write <|hole:N|> or a line holding only "
                          "<|hole-line:N|>, with N >= 1 positions")
    if text:
        pieces.append(Given(text, tuple(tokenizer.encode(text))))
