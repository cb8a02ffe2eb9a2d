"""A character-level tokenizer built locally, saved like a Hub tokenizer.

Every printable ASCII character plus newline is one token, so arithmetic, reasoning
traces and UUIDs tokenize without an unknown token, and decoding is lossless. The chat
template is ChatML with ``{% generation %}`` markers, so TRL's conversational formats and
``assistant_only_loss`` work.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, IM_START, IM_END]
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]

# ChatML. The assistant turn, including its end-of-turn token, sits inside
# {% generation %} so that assistant-only loss covers exactly what the model must write.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level toy tokenizer.

    Example:
        ```py
        >>> tok = build_toy_tokenizer()
        >>> tok.decode(tok("12+7=19")["input_ids"])
        '12+7=19'
        ```
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE with no merges is a pure character lookup; Fuse joins tokens with no separator.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="left",
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
