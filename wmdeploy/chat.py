"""``wmdeploy chat``: a conversation held in one stream's working memory.

Each turn appends the user's line (and a newline, when the vocabulary has one) to the same stream and
generates the reply on it; the model remembers earlier turns through its state alone — the history is
never re-fed. Commands: ``/reset`` (a fresh memory), ``/save FILE`` and ``/load FILE`` (snapshots),
``/quit``. Works the same when standard input is a pipe (one turn per line).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, TextIO

from .errors import InputError, WmdeployError
from .generation import generate, language_model_info


COMMANDS = ("/reset", "/save FILE", "/load FILE", "/quit")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"/load {path}: cannot read it ({exc.strerror or exc})") from None


def chat(model: Any, lines: Iterable[str], out: TextIO, *, max_tokens: int = 80, temperature: float = 0.0,
         top_k: int = 0, top_p: float = 1.0, seed: int | None = 0, prompt: str = "> ",
         separator: str | None = None) -> Any:
    """Run a conversation over ``lines``; returns the stream (its memory holds the whole conversation).

    ``separator`` ends each user turn and each reply (default: a newline when the vocabulary can encode
    one, else nothing). Turn ``i`` samples with ``seed + i`` so a replayed conversation is identical.
    """
    info = language_model_info(model.spec, str(model.path))
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
                out.write("(memory reset)\n")
            elif command in ("/save", "/load") and not arg.strip():
                raise InputError(f"{command}: expected a file name ({command} FILE)")
            elif command == "/save":
                Path(arg.strip()).write_bytes(stream.snapshot())
                out.write(f"(saved {stream.steps} steps of memory to {arg.strip()})\n")
            elif command == "/load":
                loaded = model.stream(snapshot=_read(arg.strip()))
                if loaded.batch != 1:  # refused before it replaces the conversation (no turn could run on it)
                    raise InputError(f"{arg.strip()}: a snapshot of {loaded.batch} streams; chat loads a one-stream snapshot")
                stream = loaded
                out.write(f"(loaded {arg.strip()})\n")
            elif command.startswith("/") and command[1:].isalpha():
                raise InputError(f"{command}: not a command; the commands are {', '.join(COMMANDS)}")
            elif line:
                run = generate(stream, line + separator, max_tokens=max_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=None if seed is None else seed + turn,
                               stop=separator or None)
                reply = ""
                for piece in run:
                    reply += piece
                    out.write(piece)
                    out.flush()
                if not reply.endswith("\n"):
                    out.write("\n")
                turn += 1
        except WmdeployError as exc:
            out.write(f"error: {' '.join(str(exc).split())}\n")
        except OSError as exc:  # /save into a missing folder, a full disk: the file and the reason, one line
            out.write(f"error: {exc.filename or arg.strip()}: {exc.strerror or exc}\n")
        out.write(prompt)
        out.flush()
    out.write("\n")
    return stream
