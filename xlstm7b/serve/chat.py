"""Chat messages -> prompt text: the tokenizer's own chat template when the checkpoint has one
(`chat_template` in its tokenizer_config.json, a Jinja template as in Hugging Face tokenizers),
else a plain template for base models:

    System: You are terse.

    User: Hello!

    Assistant: Hi.

    User: And now?

    Assistant:

Generation stops where the model starts the user's next turn (the stop string "\\nUser:").
"""

import json
from pathlib import Path

import jinja2.sandbox

PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = ("\nUser:",)


class ChatTemplate:
    def __init__(self, template: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.source, self.bos_token, self.eos_token = template, bos_token, eos_token
        self.template = None
        if template is not None:
            self.template = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)

    @classmethod
    def from_checkpoint(cls, folder) -> "ChatTemplate":
        """The template in `folder`/tokenizer_config.json, or the plain one."""
        path = Path(folder) / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        tokens = {k: v if isinstance(v, str) else (v or {}).get("content", "") for k, v in config.items() if k in ("bos_token", "eos_token")}
        return cls(config.get("chat_template"), tokens.get("bos_token", ""), tokens.get("eos_token", ""))

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings the template implies (the plain template's next user turn)."""
        return () if self.template is not None else PLAIN_STOP

    def render(self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
        """[{"role", "content"}] -> the prompt text, ending where the assistant's reply begins; with
        continue_final_message (and add_generation_prompt False, as in vLLM), ending inside the
        last message, an assistant's, which the reply continues. The text of a template's leading
        bos_token is left out: the server puts the BOS token first itself (twice would be a prompt
        the model never saw in training)."""
        if self.template is not None:
            text = self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
            if self.bos_token:
                text = text.removeprefix(self.bos_token)
            if continue_final_message:  # cut what the template puts after the final message's content
                last = messages[-1]["content"]
                end = text.rfind(last)
                if end < 0:
                    raise ValueError("continue_final_message: the chat template does not keep the final message's "
                                     "text as it is, so it cannot be continued")
                text = text[:end + len(last)]
            return text
        turns = [f"{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages]
        return "\n\n".join([*turns, "Assistant:"] if add_generation_prompt else turns)
