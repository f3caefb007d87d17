"""Chat templates: the text a chat model was trained on, and the built-in ones.

A chat model is still a next-token predictor; what makes it chat is the text it was trained on.
A *chat template* (a Jinja program shipped with the tokenizer) turns a list of messages into
that text, e.g. ChatML:

    <|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n

and the model answers until it writes the end-of-turn token (``<|im_end|>``).

The template is the model's own (GGUF ``tokenizer.chat_template``, a Hugging Face folder's
``chat_template.jinja`` or ``tokenizer_config.json``); checkpoints without one (Meta folders) get
a built-in: the one a Meta Llama 3 folder names (LLAMA31 for Llama 3.1 and later, whose
params.json says use_scaled_rope, else LLAMA3), LLAMA3 when the vocabulary has Llama 3's header
tokens, CHATML when it has ``<|im_start|>``, else LLAMA2. Sources: Meta's llama ``generation.py``
(Llama 2 ``chat_completion``), llama3 ``tokenizer.py`` (``ChatFormat``), llama-models' Llama 3.1
prompt format (``SystemDefaultGenerator``), OpenAI's ChatML note; transformers' chat templating docs.
Templates are rendered in npllama.chat_sandbox; the conversation is npllama.chat.ChatSession.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------ built-ins
# Llama 2 chat (Meta's chat_completion): every exchange is "<s>[INST] user [/INST] answer </s>";
# the system prompt is folded into the first user message between <<SYS>> markers; contents are
# stripped. The prompt ends with "[/INST]": Llama 2 has no assistant header.
LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = none %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Llama 2 conversations alternate user and assistant messages, starting with "
    "the user (after an optional system message)') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message is not none %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# Llama 3 (Meta's ChatFormat): <|begin_of_text|>, then per message a role header, the stripped
# content and <|eot_id|>; the generation prompt is an open assistant header.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Llama 3.1 and later (Meta's Llama 3.1 prompt format; the chat template Meta publishes with the
# 3.1, 3.2 and 3.3 checkpoints renders the same): every conversation opens with a system header
# that names the knowledge cutoff and today's date, then the system message, if any:
#   <|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n
#   Today Date: 26 July 2024\n\n{system}<|eot_id|>
# Meta's SystemDefaultGenerator writes the date as strftime("%d %B %Y"); a caller may fix it by
# passing the variable date_string, as with Meta's template.
LLAMA31 = (
    "{{ bos_token }}"
    "{% if date_string is not defined %}{% set date_string = strftime_now('%d %B %Y') %}{% endif %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] | trim %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' + 'Cutting Knowledge Date: December 2023\n'"
    " + 'Today Date: ' + date_string + '\n\n' + system_message + '<|eot_id|>' }}"
    "{% for message in loop_messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# ChatML: <|im_start|>role\ncontent<|im_end|>\n per message, no BOS.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"llama2": LLAMA2, "llama3": LLAMA3, "llama3.1": LLAMA31, "chatml": CHATML}


# ------------------------------------------------------------------------------------ where a template came from
class ChatTemplate(str):
    """The Jinja source of a chat template that remembers where it came from, for error messages
    ("model.gguf: tokenizer.chat_template", "--template chat.jinja", ".../tokenizer_config.json: chat_template")."""

    origin: str

    def __new__(cls, source: str, origin: str):
        template = super().__new__(cls, source)
        template.origin = origin
        return template


def template_origin(template: str) -> str:
    """Where a template came from (ChatTemplate.origin), or a generic name for a plain string."""
    return getattr(template, "origin", None) or "the given chat template"


MAX_TEMPLATE_CHARS = 1 << 20     # real chat templates are a few thousand characters


def special_token_variables(tokenizer) -> dict[str, str]:
    """bos_token / eos_token as the template sees them: the tokenizer's spellings of those ids."""
    out = {}
    if getattr(tokenizer, "bos_id", None) is not None:
        out["bos_token"] = tokenizer.id_to_token(tokenizer.bos_id)
    eos = tuple(getattr(tokenizer, "eos_ids", ()))
    if eos:
        out["eos_token"] = tokenizer.id_to_token(eos[0])
    return out


def builtin_template_for(tokenizer) -> str:
    """The built-in template that suits a tokenizer: the format its checkpoint names
    (``tokenizer.chat_format``: a Meta Llama 3 folder says llama3 or llama3.1), else the family its
    special tokens tell."""
    named = getattr(tokenizer, "chat_format", None)
    if named in BUILTIN_TEMPLATES:
        return named
    has = lambda t: tokenizer.token_to_id(t) is not None    # noqa: E731
    if has("<|start_header_id|>") and has("<|eot_id|>"):
        return "llama3"
    if has("<|im_start|>") and has("<|im_end|>"):
        return "chatml"
    return "llama2"


def chat_template_for(tokenizer, template: str | None = None) -> tuple[str, str]:
    """(template source, where it came from): ``template`` (a built-in name or Jinja source), else
    the tokenizer's own, else a built-in chosen by :func:`builtin_template_for`."""
    if template is not None:
        if template in BUILTIN_TEMPLATES:
            return ChatTemplate(BUILTIN_TEMPLATES[template], f"built-in template {template}"), f"built-in {template}"
        return template, getattr(template, "origin", None) or "given"
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own, "the model's own"
    name = builtin_template_for(tokenizer)
    return ChatTemplate(BUILTIN_TEMPLATES[name], f"built-in template {name}"), f"built-in {name}"
