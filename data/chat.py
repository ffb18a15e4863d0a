"""Chat templates: a conversation -> text pieces, each marked trained (assistant) or not (system, user, markers).

A template is one turn format with `{content}` once and optionally `{role}`, e.g. chatml's
"<|im_start|>{role}\n{content}<|im_end|>\n". A turn is rendered as the text before `{content}` (never
trained), the content, and the text after it (the turn's end marker); an assistant turn trains on its content
and its end marker, so the model learns to stop. System and user turns train on nothing.

`data.chat_template` is one of the names in TEMPLATES or a format string of that shape. The markers are plain
text: a tokenizer with special pieces for them (a Hugging Face tokenizer.json) may encode each as one id, a
kiln sentencepiece tokenizer spells them with ordinary pieces; either way the model learns them like any text.
"""

from collections.abc import Sequence

from data.errors import DataError

ROLES = ("system", "user", "assistant")
TRAINED_ROLE = "assistant"

TEMPLATES = {
  "chatml": "<|im_start|>{role}\n{content}<|im_end|>\n",
  "llama3": "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
  "plain": "{role}: {content}\n\n",
}


def template_problem(template: str) -> str | None:
  """Why `template` (a name or a format string) cannot be used, in one line; None when it can."""
  if template in TEMPLATES:
    return None
  if template.count("{content}") != 1:
    return (
      f"config.data.chat_template={template!r} is neither one of {', '.join(TEMPLATES)} nor a turn format with "
      "{content} exactly once (and optionally {role}), e.g. '<|{role}|>\\n{content}</s>\\n'"
    )
  rest = template.replace("{content}", "").replace("{role}", "")
  if "{" in rest or "}" in rest:
    return (
      f"config.data.chat_template={template!r} has a brace besides {{role}} and {{content}}; "
      "only those two placeholders are filled in"
    )
  return None


def checked_turn_format(template: str) -> str:
  """`turn_format`, with a template that cannot be used raised as a one-line DataError (user input)."""
  problem = template_problem(template)
  if problem is not None:
    raise DataError(problem)
  return turn_format(template)


def turn_format(template: str) -> str:
  """The format string of a template name (or the template itself, when it is a format string)."""
  problem = template_problem(template)
  assert problem is None, problem
  return TEMPLATES.get(template, template)


def render(messages: Sequence[dict], fmt: str) -> list[tuple[str, bool]]:
  """[(text, trained)] of a conversation whose messages are {"role", "content"} dicts already checked."""
  head, tail = fmt.split("{content}")
  pieces = []
  for message in messages:
    role, content = message["role"], message["content"]
    trained = role == TRAINED_ROLE
    pieces.append((head.replace("{role}", role), False))
    pieces.append((content + tail.replace("{role}", role), trained))
  return [(text, trained) for text, trained in pieces if text]


def prompt_text(messages: Sequence[dict], fmt: str) -> str:
  """A conversation rendered and followed by the head of an assistant turn: what the model continues."""
  return "".join(piece for piece, _ in render(messages, fmt)) + fmt.split("{content}")[0].replace(
    "{role}", TRAINED_ROLE
  )


def check_messages(messages: object, where: str) -> list[dict]:
  """The messages of one example, or a DataError naming `where` (file:line) and the fix."""
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
      raise DataError(f"{where}: message {i} needs a string 'content'; write {{'role': ..., 'content': '...'}}")
    if message.get("role") not in ROLES:
      raise DataError(f"{where}: message {i} has role {message.get('role')!r}; use one of {', '.join(ROLES)}")
  return messages
