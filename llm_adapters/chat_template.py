"""The chat template of a chat-model directory, and the assistant-token loss mask it yields.

Rendered conversation (saved with the tokenizer as ``chat_template.jinja``)::

    <s>{system}\\n                      only when there is a system message
    USER: {content}\\n
    ASSISTANT:\\n{content}</s>\\n        "{content}</s>" is wrapped in {% generation %}
    ASSISTANT:\\n                       add_generation_prompt=True

The reply starts after a newline: the newline is a byte token in every LLaMA vocabulary, so the
prompt's last token never merges with the reply's first (a trailing space would: ``"▁"`` in the
prompt vs ``"▁a"`` in training). Content is a string or a list of items concatenated with nothing
in between: ``{"type": "text", "text": …}`` or ``{"type": "image", …}``. An image item renders as
its ``span`` (``"<img>…</img>"``, filled in by :class:`~llm_adapters.processor.SeedProcessor`) or,
without one, as the placeholder ``<image>`` that the processor expands.

The ``{% generation %}`` block makes ``apply_chat_template(..., return_assistant_tokens_mask=True)``
mark exactly the assistant's tokens and its ``</s>`` — the positions that carry the loss when
training on answers only (SEED-LLaMA's instruction tuning).
"""

from __future__ import annotations

from typing import Any

import torch

IMAGE_PLACEHOLDER = "<image>"
CAPTION_INSTRUCTION = "Describe the image."
IGNORE_INDEX = -100

CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ item['span'] if item['span'] is defined and item['span'] else '" + IMAGE_PLACEHOLDER + "' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- else -%}{{ raise_exception('unknown content type: ' + item['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ render(message['content']) + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + render(message['content']) + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT:\\n' }}"
    "{%- generation -%}{{ render(message['content']) + eos_token }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:\\n' }}{%- endif -%}"
)


def set_chat_template(tokenizer: Any) -> Any:
    """Give ``tokenizer`` the toolkit's chat template (saved by ``save_pretrained``); returns it."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_labels(input_ids: torch.Tensor | list[int], assistant_masks: torch.Tensor | list[int]) -> torch.Tensor | list[int]:
    """Labels for answer-only training: ``input_ids`` where the assistant mask is 1, ``-100`` elsewhere.

    Args:
        input_ids: ``(T,)`` or ``(B, T)`` ids (tensor or list).
        assistant_masks: same shape, 1 on assistant tokens (from ``return_assistant_tokens_mask=True``).

    Returns the same type as ``input_ids``. (The causal shift is the model's job: transformers'
    ``LlamaForCausalLM(labels=…)`` shifts internally.)
    """
    if isinstance(input_ids, torch.Tensor):
        mask = torch.as_tensor(assistant_masks, device=input_ids.device).bool()
        return torch.where(mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    if input_ids and isinstance(input_ids[0], list):
        return [chat_labels(i, m) for i, m in zip(input_ids, assistant_masks)]
    return [t if m else IGNORE_INDEX for t, m in zip(input_ids, assistant_masks)]
