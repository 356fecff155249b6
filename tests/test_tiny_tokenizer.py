from transformers import AutoTokenizer

from opdplus.tiny import build_char_tokenizer
from opdplus.tiny.tokenizer import ASSISTANT, END, PAD, UNK, USER


def test_chat_template_renders_user_turn_and_generation_prompt():
    tokenizer = build_char_tokenizer()
    messages = [{"role": "user", "content": "12+3="}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>12+3=<|assistant|>"
    full = messages + [{"role": "assistant", "content": "15"}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == "<|user|>12+3=<|assistant|>15<|end|>"


def test_special_tokens_are_single_ids_and_pad_differs_from_eos():
    tokenizer = build_char_tokenizer()
    assert tokenizer.pad_token == PAD and tokenizer.eos_token == END and tokenizer.unk_token == UNK
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = [tokenizer.convert_tokens_to_ids(token) for token in (PAD, UNK, END, USER, ASSISTANT)]
    assert len(set(ids)) == 5
    for token, token_id in zip((PAD, UNK, END, USER, ASSISTANT), ids):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]


def test_character_level_without_bos_or_eos():
    tokenizer = build_char_tokenizer()
    text = '{"name":"timer","arguments":{"minutes":5}} 37-45=-8;#'
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, nothing added
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer("é")["input_ids"] == [tokenizer.unk_token_id]


def test_round_trip_through_save_and_auto_tokenizer(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>weather in oslo?<|assistant|>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.pad_token_id == tokenizer.pad_token_id
    assert reloaded.eos_token_id == tokenizer.eos_token_id
    assert len(reloaded) == len(tokenizer)
    messages = [{"role": "user", "content": "1+2="}]
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "<|user|>1+2=<|assistant|>"
