"""``wmdeploy chat``: a conversation held in one stream's working memory.

Each turn appends the user's line (and a newline, when the vocabulary has one) to the same stream and
generates the reply on it; the model remembers earlier turns through its state alone — the history is
never re-fed. Commands: ``/reset`` (a fresh memory), ``/save FILE`` and ``/load FILE`` (snapshots),
``/quit``. Works the same when standard input is a pipe (one turn per line).

A file with a chat template (``export hf:`` of a folder that has one): each turn renders the whole
conversation (the messages so far and the new user message, ``add_generation_prompt=True``, as
transformers' ``apply_chat_template``) and prefills only the tokens the memory does not hold yet: the
memory holds the ids of every earlier prompt and reply token, and the new ids are what follows them in the
rendered conversation. When the rendered ids do not extend the held ones token for token but the rendered
text extends the held text, the rest of the text is tokenized on its own (the memory holds the tokens the
model generated, which need not be how the tokenizer would cut the same text). Otherwise the memory is
reset and the whole conversation re-read (said once). The reply ends at the model's eos token.
``/save`` of such a chat keeps the held ids and the messages in the snapshot's meta (``chat``), so that
``/load`` resumes the conversation; a snapshot without them (a server session, a plain ``Stream.snapshot``)
is kept as an opaque start of the memory that the next turns are appended to.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, TextIO

from . import snapshot as _snap
from .errors import InputError, WmdeployError
from .generation import generate, language_model_info


COMMANDS = ("/reset", "/save FILE", "/load FILE", "/quit")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"/load {path}: cannot read it ({exc.strerror or exc})") from None


class _Conversation:
    """The templated conversation and the token ids the stream holds since ``base`` (an opaque loaded start)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.template = tokenizer, tokenizer.chat_template
        self.messages: list[dict[str, str]] = []
        self.held: list[int] = []
        self.base = 0  # tokens of a loaded memory that came without its ids: kept, never re-rendered
        self.warned = False

    def clear(self, base: int = 0) -> None:
        self.messages, self.held, self.base = [], [], base

    def new_ids(self, stream: Any, line: str, out: TextIO) -> tuple[list[int], list[dict[str, str]], bool]:
        """The ids to prefill for user turn ``line`` (resetting the stream when the memory cannot be extended)."""
        messages = [*self.messages, {"role": "user", "content": line}]
        text = self.template.render(messages, add_generation_prompt=True)
        hf = self.tokenizer.hf
        ids = hf.encode(text, add_special_tokens=False)
        held = self.held
        if self.base + len(held) != stream.position:  # a turn that failed half-way: the ids are not known
            held = [-1]
        if ids[:len(held)] == held:
            return ids[len(held):], messages, False
        seen = hf.decode(held, skip_special_tokens=False) if held != [-1] else None
        if seen is not None and text.startswith(seen):
            rest = hf.encode(text[len(seen):], add_special_tokens=False)
            if hf.decode(held + rest, skip_special_tokens=False) == text:  # the same text, cut differently
                return rest, messages, False
        if not self.warned:
            out.write("(the rendered conversation does not extend what the memory holds: the memory is reset and "
                      "the whole conversation re-read when that happens)\n")
            self.warned = True
        stream.reset()
        self.held, self.base = [], 0
        return ids, messages, True

    def snapshot_meta(self, stream: Any) -> dict[str, Any]:
        return {"steps": stream.steps, "chat": {"tokens": self.held, "messages": self.messages, "base": self.base}}

    def restore(self, blob: bytes, stream: Any) -> str:
        saved = _snap.meta(blob).get("chat")
        ok = isinstance(saved, dict) and isinstance(saved.get("tokens"), list) and isinstance(saved.get("messages"), list)
        base = saved.get("base", 0) if ok else 0
        if ok and isinstance(base, int) and base + len(saved["tokens"]) == stream.position and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in saved["messages"]):
            self.messages = [{"role": m["role"], "content": m["content"]} for m in saved["messages"]]
            self.held, self.base = [int(t) for t in saved["tokens"]], base
            return f"{len(self.messages)} messages"
        self.clear(base=stream.position)
        return "no conversation in it: the next turns continue its memory"


def _save(stream: Any, conversation: _Conversation | None) -> bytes:
    if conversation is None:
        return stream.snapshot()
    return _snap.dumps(stream.spec, dict(stream.state), conversation.snapshot_meta(stream))


def chat(model: Any, lines: Iterable[str], out: TextIO, *, max_tokens: int = 80, temperature: float = 0.0,
         top_k: int = 0, top_p: float = 1.0, seed: int | None = 0, prompt: str = "> ",
         separator: str | None = None, turns: list[dict[str, Any]] | None = None) -> Any:
    """Run a conversation over ``lines``; returns the stream (its memory holds the whole conversation).

    ``separator`` ends each user turn and each reply (default: a newline when the vocabulary can encode
    one, else nothing) of a file without a chat template. Turn ``i`` samples with ``seed + i`` so a replayed
    conversation is identical. ``turns``, when given, gets one dict per reply: ``prefilled`` (tokens read
    for the turn), ``tokens`` (the reply's ids), ``finish_reason``, ``reset`` (the memory was re-read whole).
    """
    info = language_model_info(model.spec, str(model.path), model)
    conversation = _Conversation(info.tokenizer) if info.tokenizer.chat_template is not None else None
    if separator is None:
        try:
            info.tokenizer.encode("\n")
            separator = "\n"
        except WmdeployError:
            separator = ""
    stream = model.stream()
    turn = 0
    out.write(prompt)
    out.flush()
    for raw in lines:
        line = raw.rstrip("\r\n")
        command, _, arg = line.strip().partition(" ")
        try:
            if command == "/quit":
                break
            if command == "/reset":
                stream.reset()
                if conversation is not None:
                    conversation.clear()
                out.write("(memory reset)\n")
            elif command in ("/save", "/load") and not arg.strip():
                raise InputError(f"{command}: expected a file name ({command} FILE)")
            elif command == "/save":
                Path(arg.strip()).write_bytes(_save(stream, conversation))
                out.write(f"(saved {stream.steps} steps of memory to {arg.strip()})\n")
            elif command == "/load":
                blob = _read(arg.strip())
                loaded = model.stream(snapshot=blob)
                if loaded.batch != 1:  # refused before it replaces the conversation (no turn could run on it)
                    raise InputError(f"{arg.strip()}: a snapshot of {loaded.batch} streams; chat loads a one-stream snapshot")
                stream = loaded
                said = f": {conversation.restore(blob, stream)}" if conversation is not None else ""
                out.write(f"(loaded {arg.strip()}{said})\n")
            elif command.startswith("/") and command[1:].isalpha():
                raise InputError(f"{command}: not a command; the commands are {', '.join(COMMANDS)}")
            elif line:
                turn_seed = None if seed is None else seed + turn
                options = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=turn_seed)
                reset, messages = False, None
                if conversation is not None:
                    ids, messages, reset = conversation.new_ids(stream, line, out)
                    run = generate(stream, ids, **options)
                else:
                    run = generate(stream, line + separator, stop=separator or None, **options)
                reply = ""
                for piece in run:
                    reply += piece
                    out.write(piece)
                    out.flush()
                if not reply.endswith("\n"):
                    out.write("\n")
                if conversation is not None and messages is not None:
                    conversation.held += [*ids, *run.tokens]
                    conversation.messages = [*messages, {"role": "assistant", "content": reply}]
                if turns is not None:
                    turns.append({"prefilled": run.stats.prompt_tokens, "tokens": list(run.tokens),
                                  "finish_reason": run.finish_reason, "reset": reset})
                turn += 1
        except WmdeployError as exc:
            out.write(f"error: {' '.join(str(exc).split())}\n")
        except OSError as exc:  # /save into a missing folder, a full disk: the file and the reason, one line
            out.write(f"error: {exc.filename or arg.strip()}: {exc.strerror or exc}\n")
        out.write(prompt)
        out.flush()
    out.write("\n")
    return stream
