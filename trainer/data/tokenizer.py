"""Training tokenizers (byte-level BPE or SentencePiece) and saving them in Hugging Face format.

Both kinds end up as a `tokenizers`-backed `PreTrainedTokenizerFast` folder that
`transformers.AutoTokenizer.from_pretrained(DIR)` loads with bos/eos/pad set, the
chat tokens reserved as special tokens, and a Llama-3 style chat template.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import datasets
from rich.console import Console
from rich.markup import escape
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from trainer.data.sources import DataError, TextMode, load_documents
from trainer.data.staging import staged_folder

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
UNK = "<unk>"
CHAT_TOKENS: tuple[str, ...] = (
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
)
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, *CHAT_TOKENS)
TokenizerKind = Literal["bpe", "sentencepiece"]
KINDS: tuple[str, ...] = ("bpe", "sentencepiece")

# Llama-3's layout; the SFT data path may bring its own template, this one makes the tokenizer usable as is.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Lines longer than this are dropped by SentencePiece's trainer; documents are fed line by line.
_SP_MAX_SENTENCE_BYTES = 1 << 16


def train_tokenizer(
    inputs: list[str | Path],
    out_dir: str | Path,
    kind: TokenizerKind = "bpe",
    vocab_size: int = 32000,
    text_field: str = "text",
    text_mode: TextMode = "paragraph",
    skip_bad_rows: bool = False,
    num_proc: int | None = None,
    overwrite: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a `kind` tokenizer of `vocab_size` entries (special tokens included) on the inputs, save it to `out_dir`.

    Inputs are read like `prepare_data` reads them (see `trainer.data.sources.load_documents`).
    The folder is written under a temporary name and renamed at the end, so a failed run
    leaves nothing behind.
    """
    if kind not in KINDS:
        raise DataError(f"tokenizer kind '{kind}' is not one of {', '.join(KINDS)}")
    minimum = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise DataError(f"vocab_size {vocab_size} is too small: byte coverage and special tokens need at least {minimum}")
    with staged_folder(out_dir, overwrite) as tmp:
        docs, found = load_documents(inputs, text_field=text_field, text_mode=text_mode,
                                     skip_bad_rows=skip_bad_rows, num_proc=num_proc, cache_dir=tmp / ".cache")
        if len(docs) == 0:
            raise DataError(f"no documents found in {', '.join(map(str, inputs))}")
        if found.skipped_rows:
            Console(stderr=True).print(f"[yellow]skipped {found.skipped_rows} bad row(s)[/], "
                                       f"e.g. {escape(found.skipped_examples[0])}")
        if kind == "bpe":
            backend = _train_bpe(docs, vocab_size)
        else:
            backend, sp_model = _train_sentencepiece(docs, vocab_size)
            (tmp / "sentencepiece.model").write_bytes(sp_model)
        tok = _wrap(backend, with_unk=kind == "sentencepiece")
        del docs  # release the Arrow memory maps before their files go
        shutil.rmtree(tmp / ".cache")
        tok.save_pretrained(str(tmp))
    return AutoTokenizer.from_pretrained(str(out_dir))


def _texts(docs: datasets.Dataset, batch_size: int = 1000) -> Iterator[list[str]]:
    for batch in docs.iter(batch_size=batch_size):
        yield batch["text"]


def _train_bpe(docs: datasets.Dataset, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Byte-level: every string round-trips exactly and no unknown token exists.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )
    tok.train_from_iterator(_texts(docs), trainer=trainer, length=len(docs))
    return tok


def _sp_sentences(docs: datasets.Dataset) -> Iterator[str]:
    for texts in _texts(docs):
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line


def _train_sentencepiece(docs: datasets.Dataset, vocab_size: int) -> tuple[Tokenizer, bytes]:
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sp_sentences(docs), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True,
            # Identity normalization and kept whitespace make decode(encode(text)) == text.
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, max_sentence_length=_SP_MAX_SENTENCE_BYTES,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            control_symbols=list(CHAT_TOKENS), input_sentence_size=2_000_000, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].split("] ")[-1]
        raise DataError(f"sentencepiece training failed: {reason}") from exc
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # Merges come from normal pieces only: control and byte pieces are reached by id or by byte
    # fallback, never by merging text (a literal "<0x0A>" in a document stays five characters).
    normal = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_sp_bpe_merges(vocab, normal), unk_token=UNK,
                               fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok, proto


def _sp_bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges that rebuild SentencePiece's pieces: a SentencePiece BPE piece's score is minus its merge rank."""
    merges = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in scores and right in scores:
                merges.append((score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(left, right) for _, _, _, left, right in merges]


def _wrap(backend: Tokenizer, with_unk: bool) -> PreTrainedTokenizerFast:
    bos_id = backend.token_to_id(BOS)
    # Like Llama-3: encoding adds BOS; EOS is left to the data path (documents) and chat template (turns).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)],
    )
    extra = {"unk_token": UNK} if with_unk else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(CHAT_TOKENS), clean_up_tokenization_spaces=False,
        model_max_length=int(1e30), **extra,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(tokenizer: str | Path | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A tokenizer object from a local HF-format folder (or the object itself)."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    path = Path(tokenizer)
    if not path.is_dir():
        raise DataError(f"{path}: tokenizer folder not found")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises several types for a broken folder; name the folder
        raise DataError(f"{path}: cannot load tokenizer: {str(exc).strip().splitlines()[0]}") from exc


def tokenizer_hash(tokenizer: str | Path | PreTrainedTokenizerBase) -> str:
    """A short sha256 of what maps text to ids: the model (vocab, merges), normalizer, pre-tokenizer, added tokens.

    Truncation/padding state and the post-processor are left out: transformers mutates the
    former at call time, and token shards add BOS/EOS themselves.
    """
    tok = load_tokenizer(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        payload = {key: spec.get(key) for key in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    else:
        payload = {"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items())}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


__all__ = [
    "BOS", "EOS", "PAD", "CHAT_TOKENS", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "train_tokenizer", "load_tokenizer",
    "tokenizer_hash",
]
