"""A copy of a model whose vocabulary is permuted: the same token strings under other ids, embedding (and head)
rows moved to match. It is the same model in every respect but its ids, so a teacher built from it must score
exactly as the original once the ids are mapped (issue 17's "mapped" relation)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opdplus.models import load_model_and_tokenizer


def write_permuted_copy(spec: str, out_dir, seed: int = 0) -> Path:
    """Save a permuted copy of `spec` (a `tiny:` name or a directory) to `out_dir`; returns that directory.

    Every tokenizer id i (special tokens included) becomes perm[i]; embedding rows beyond the tokenizer's
    vocabulary (padding) stay where they are. Token ids in config.json and generation_config.json follow.
    """
    out_dir = Path(out_dir)
    model, tokenizer = load_model_and_tokenizer(spec)
    size = len(tokenizer.get_vocab())
    if sorted(tokenizer.get_vocab().values()) != list(range(size)):
        raise ValueError(f"{spec}: the tokenizer's ids are not 0..{size - 1}")
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))  # old id -> new id
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(size))  # new id -> old id

    def permute_rows(weight: torch.Tensor) -> None:
        with torch.no_grad():
            weight[:size] = weight[:size][inverse].clone()

    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    permute_rows(embeddings)
    if head.data_ptr() != embeddings.data_ptr():  # untied: the head's rows move too (tied: already moved)
        permute_rows(head)
        bias = getattr(model.get_output_embeddings(), "bias", None)
        if bias is not None:
            permute_rows(bias)
    for config in (model.config, model.generation_config):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                setattr(config, name, int(perm[value]))
            elif isinstance(value, list):
                setattr(config, name, [int(perm[v]) for v in value])
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    path = out_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    if not isinstance(vocab, dict):
        raise ValueError(f"{spec}: only token -> id vocabularies (BPE, WordPiece, WordLevel) can be permuted")
    data["model"]["vocab"] = {token: int(perm[token_id]) for token, token_id in vocab.items()}
    for added in data["added_tokens"]:
        added["id"] = int(perm[added["id"]])
    processor = data.get("post_processor") or {}
    for special in (processor.get("special_tokens") or {}).values():
        special["ids"] = [int(perm[token_id]) for token_id in special["ids"]]
    path.write_text(json.dumps(data, ensure_ascii=False))
    return out_dir
