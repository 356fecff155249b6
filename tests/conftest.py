"""Shared fixtures: tiny random student and teacher made on the spot (no hub, no committed weights).

benchmarks/ goes on the import path: tests start vLLM servers with its `vllm_server` helper, as benchmarks do.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from opdplus.tiny import build_char_tokenizer, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_char_tokenizer()
    paths = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        config = tiny_config(len(tokenizer), 1, 32, 4, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config)
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths
