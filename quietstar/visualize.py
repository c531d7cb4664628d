"""Show generated text with the thought behind each token: inline in a terminal, or as an HTML page."""

from __future__ import annotations

import html

DIM_CYAN, RESET = "\033[2;36m", "\033[0m"

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; line-height: 1.9; }}
.prompt {{ color: #555; }}
.token {{ border-bottom: 2px solid rgba(0, 120, 200, var(--w)); cursor: help; white-space: pre-wrap; }}
.thought {{ color: #0a7a8a; font-size: 0.8em; background: #eef8fa; border-radius: 3px; padding: 0 2px;
            white-space: pre-wrap; }}
.legend {{ color: #777; font-size: 0.85em; }}
</style></head><body>
<h1>{title}</h1>
<p class="legend">Each generated token follows the thought (in teal) the model had just before it; the underline's
strength is the mixing weight on the thought-conditioned prediction. Hover a token for its numbers.</p>
<p><span class="prompt">{prompt}</span>{body}</p>
</body></html>
"""


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids])


def render_terminal(tokenizer, prompt_ids, new_ids, thoughts, color: bool = True) -> str:
    """The prompt, then each new token preceded by its thought in ``[...]`` (dim cyan when ``color``)."""
    start, end = (DIM_CYAN, RESET) if color else ("", "")
    parts = [_decode(tokenizer, prompt_ids)]
    for token, thought in zip(new_ids, thoughts):
        parts.append(f"{start}[{_decode(tokenizer, thought)}]{end}{_decode(tokenizer, [token])}")
    return "".join(parts)


def render_html(tokenizer, prompt_ids, new_ids, thoughts, mixing_weights, title: str = "Quiet-STaR thoughts") -> str:
    """A self-contained HTML page: prompt, then every new token with its thought and mixing weight."""
    pieces = []
    for token, thought, weight in zip(new_ids, thoughts, mixing_weights):
        text = html.escape(_decode(tokenizer, [token]))
        thought_text = html.escape(_decode(tokenizer, thought))
        strength = min(max(abs(float(weight)), 0.0), 1.0)
        pieces.append(f'<span class="thought">{thought_text}</span><span class="token" style="--w: {strength:.2f}" '
                      f'title="mixing weight {float(weight):.3f}">{text}</span>')
    return _PAGE.format(title=html.escape(title), prompt=html.escape(_decode(tokenizer, prompt_ids)),
                        body="".join(pieces))
