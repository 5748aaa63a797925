"""transformers' `apply_chat_template` on the templates in chat/ (imported by make_reference.py).

For every family and conversation: the rendered text and its token ids, and for every
assistant turn the two byte offsets the loss mask is built from (see src/data/chat.rs): where
the turn starts (the length of the conversation before it rendered with
add_generation_prompt=True) and where its content ends (the first byte at which the rendering
differs when the content gets a marker appended).
"""
import json
from pathlib import Path

MARK = "\ue000"


def _tokenizer(here: Path, fam: dict):
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(here.parent / "kronfluence-smollm2-2l" / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fam["special"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam["added"]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **fam["tokens"])


def _first_diff(a: str, b: str) -> int:
    ab, bb = a.encode(), b.encode()
    n = min(len(ab), len(bb))
    return next((i for i in range(n) if ab[i] != bb[i]), n)


def chat(here: Path) -> dict:
    import transformers

    chat_dir = here / "chat"
    families = json.loads((chat_dir / "families.json").read_text())["families"]
    conversations = json.loads((chat_dir / "conversations.json").read_text())
    out = {"transformers_version": transformers.__version__, "results": {}}
    for name, fam in families.items():
        tok = _tokenizer(here, fam)
        template = (chat_dir / fam["template"]).read_text()
        kwargs = fam["kwargs"]

        def render(msgs, gen=False):
            return tok.apply_chat_template(
                msgs, chat_template=template, tokenize=False, add_generation_prompt=gen, **kwargs
            )

        results = {}
        for conv in conversations:
            msgs = conv["messages"]
            text = render(msgs)
            ids = tok.apply_chat_template(
                msgs, chat_template=template, tokenize=True, return_dict=False, **kwargs
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            turns = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                prefix = render(msgs[:i], gen=True)
                marked = [dict(x) for x in msgs]
                marked[i]["content"] = marked[i]["content"] + MARK
                turns.append(
                    {
                        "message": i,
                        "prefix_is_prefix": text.startswith(prefix),
                        "start": len(prefix.encode()),
                        "content_end": _first_diff(text, render(marked)),
                    }
                )
            results[conv["name"]] = {"text": text, "ids": list(ids), "turns": turns}
        out["results"][name] = results
    return out
