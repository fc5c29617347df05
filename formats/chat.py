"""
formats/chat.py: a chat model's own prompt format. SmolLM2-Instruct carries a ChatML template in its
GGUF metadata (formats/checkpoints.py reads it into enc.chat_template); sample.py --chat renders one
user turn with it. ChatML is the only template rendered; any other is refused in one line.
"""
import re


def chat_prompt(enc, prompt, source):
    """The user's turn in ChatML, as the model's template renders one user message followed by the
    assistant's start (add_generation_prompt). SmolLM2's template adds a default system turn when
    the first message is not one; we take that text from the template itself. Its special tokens
    are added as ids, so a prompt that spells '<|im_end|>' stays text."""
    template = getattr(enc, "chat_template", None)
    if template is None:
        raise ValueError(f"--chat: {source} carries no chat template; leave out --chat")
    if "<|im_start|>" not in template or "<|im_start|>" not in enc.special_tokens_set:
        raise ValueError(f"--chat: {source}'s chat template is not ChatML (<|im_start|>...), which is "
                         "the only one nanosteer renders; leave out --chat")
    start, end = enc.encode_single_token("<|im_start|>"), enc.encode_single_token("<|im_end|>")

    def turn(role, text):
        return [start] + enc.encode_ordinary(f"{role}\n{text}") + [end] + enc.encode_ordinary("\n")

    system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.DOTALL)
    ids = turn("system", system.group(1)) if system else []
    return ids + turn("user", prompt) + [start] + enc.encode_ordinary("assistant\n")
