"""OpenAI's CLIP tokenizer as a Hugging Face tokenizer folder, written offline from open_clip's own BPE files.

Stable Diffusion pipelines ship ``tokenizer/`` (``vocab.json`` + ``merges.txt``: OpenAI's byte-level BPE, 49,408
tokens) and pad with a configurable token: SD 1.x with the end token ``<|endoftext|>``, SD 2.x with ``!`` (id 0,
as open_clip's ``SimpleTokenizer``). open_clip bundles the same BPE (``bpe_simple_vocab_16e6.txt.gz``), so the
folder can be written without a download: for an original single-file checkpoint, which has no tokenizer, and for
tests that build a pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from open_clip.tokenizer import SimpleTokenizer

END = "<|endoftext|>"
START = "<|startoftext|>"


def write_clip_tokenizer(folder: str | os.PathLike, pad_token: str = END, context_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of OpenAI's CLIP BPE to ``folder``; the
    ``transformers`` ``CLIPTokenizer`` loads it and gives the ids of open_clip's tokenizer (up to the padding)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = SimpleTokenizer()
    names = {bpe.sot_token_id: START, bpe.eot_token_id: END}  # open_clip spells them <start_of_text>, ...
    vocab = {names.get(i, token): i for token, i in bpe.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": START,
              "eos_token": END, "unk_token": END, "pad_token": pad_token, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad_token}, indent=2))
    return folder
