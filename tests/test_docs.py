"""Every fenced ``bash`` and ``python`` block of README.md and docs/**/*.md runs, each as its own test.

A block's test id is ``PAGE:LINE`` (the line of its opening fence). The blocks of a page run in order, in one
working folder per page under pytest's temporary directory: the repository's ``models/``, ``tests/``,
``bench/`` and ``js/`` are linked into it (the README's commands run from the repository root) and the files
that earlier pages make (``out/lm.onnx``, ``out/lm.int8.onnx``, ``out/recall.onnx``, ``my-qwen3/``,
``out/qwen3.onnx``) are built once per session and copied in. Nothing is written into the checkout.
Selecting one block (``-k``) runs the page's earlier blocks first, as its set-up.

A bash block runs under ``set -euo pipefail`` (every command must succeed); what it exports is there for the
page's later blocks. A Python block runs as a script. Markers, in an HTML comment on the line before a
fence (``docs/authors.md`` has the table): ``skip REASON``, ``slow REASON`` (run only with
``WMDEPLOY_DOCS_SLOW=1``), ``server PORT[,PORT]`` (started in the background, stopped at the page's next
server block or at the end; ports 8000/8001 of the page become free ones), ``requires MODULE``, ``exit N``,
``file NAME``; several in one comment, separated by ``;``.

"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLOW = os.environ.get("WMDEPLOY_DOCS_SLOW") == "1"
BLOCK_TIMEOUT_S = 300
SERVER_START_S = 90
LANGS = {"bash", "python"}
DIRECTIVES = {"skip", "slow", "server", "requires", "exit", "file"}
LINKED = ("models", "tests", "bench", "js", "docs", "mkdocs.yml", "ARCHITECTURE.md")  # what the blocks read from the root

_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)\s*$")
_PORT = re.compile(r"(?<![\d.])(8000|8001)(?!\d)")



@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    markers: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    def marker(self, name: str) -> str | None:
        return next((arg for key, arg in self.markers if key == name), None)

    def skip_reason(self) -> str | None:
        if (reason := self.marker("skip")) is not None:
            return reason or "marked skip"
        if (reason := self.marker("slow")) is not None and not SLOW:
            return f"slow ({reason}): run with WMDEPLOY_DOCS_SLOW=1"
        for module in (self.marker("requires") or "").replace(",", " ").split():
            if importlib.util.find_spec(module) is None:
                return f"needs the Python module {module}, which is not installed"
        return None


def _parse_markers(text: str, where: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, arg = part.partition(" ")
        if name in DIRECTIVES:
            out.append((name, arg.strip()))
        elif out:  # a ";" inside a reason: the part goes on the previous marker
            out[-1] = (out[-1][0], f"{out[-1][1]}; {part}")
        else:
            raise ValueError(f"{where}: unknown docs-test marker {name!r} (known: {sorted(DIRECTIVES)})")
    return tuple(out)


def parse_blocks(path: Path) -> list[Block]:
    """The fenced bash/python blocks of one Markdown file, with the marker on the line before each."""
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group("indent"), m.group("fence"), m.group("lang")
        start, body = i, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        if lang not in LANGS:
            continue
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mm = _MARKER.match(prev)
        markers = _parse_markers(mm.group(1), f"{rel}:{start + 1}") if mm else ()
        blocks.append(Block(rel, start + 1, lang, "\n".join(body) + "\n", markers))
    return blocks


def doc_pages() -> list[Path]:
    pages = [ROOT / "README.md"] if (ROOT / "README.md").exists() else []
    return pages + sorted((ROOT / "docs").rglob("*.md"))


def collect() -> list[Block]:
    blocks = []
    for page in doc_pages():
        blocks += parse_blocks(page)
    return blocks


BLOCKS = collect()


# ---------------------------------------------------------------------------------------------- running

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)  # the venv's wmdeploy and python first
    env.update(PATH=bindir + os.pathsep + env.get("PATH", ""), PYTHONDONTWRITEBYTECODE="1", COLUMNS="100",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_MKDOCS_2_WARNING="1")
    env.pop("PYTHONPATH", None)
    return env


def _sh(cmd: str, cwd: Path, timeout: float = BLOCK_TIMEOUT_S) -> None:
    r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + cmd], cwd=cwd, env=_env(), capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{cmd}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="session")
def doc_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the pages share (the Quick start's and the Hugging Face page's), built once, as they make them."""
    d = tmp_path_factory.mktemp("docs_artifacts")
    for name in LINKED:
        (d / name).symlink_to(ROOT / name)
    lm = ("wmdeploy export wmdeploy.models.lstm_lm:LSTMLanguageModel --checkpoint models/checkpoints/lstm_lm.pt "
          "-o out/lm.onnx && wmdeploy quantize out/lm.onnx -o out/lm.int8.onnx --mode int8-dynamic && "
          "wmdeploy export wmdeploy.models.gru_attention:GRUAttentionLM "
          "--checkpoint models/checkpoints/gru_attention_recall.pt -o out/recall.onnx")
    hf = ("python -c \"import transformers, pathlib; from tests._hf_folders import save_folder; "
          "save_folder(transformers.Qwen3Config(vocab_size=320, hidden_size=128, intermediate_size=256, "
          "num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, "
          "max_position_embeddings=4096), pathlib.Path('my-qwen3'))\" && "
          "wmdeploy export hf:my-qwen3 -o out/qwen3.onnx --max-context 1024")
    (d / "out").mkdir()
    procs = [subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + cmd], cwd=d, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
             for cmd in (lm, hf)]
    for cmd, p in zip((lm, hf), procs):
        out, _ = p.communicate(timeout=BLOCK_TIMEOUT_S)
        assert p.returncode == 0, f"building the docs' shared files failed: {cmd}\n{out[-4000:]}"
    for name in LINKED:
        (d / name).unlink()
    return d


@dataclass
class PageRun:
    """One page's working folder, its blocks' outcomes so far, its exported variables and its servers."""

    page: str
    dir: Path
    ports: dict[str, str]
    outcome: dict[int, str] = field(default_factory=dict)  # line -> "ok" | "failed" | "skipped"
    servers: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    @property
    def env_file(self) -> Path:
        return self.dir / ".docs-test-env"

    def code(self, block: Block) -> str:
        return _PORT.sub(lambda m: self.ports[m.group(1)], block.code)

    def script(self, block: Block) -> str:
        code = self.code(block)
        if block.lang == "python":
            name = block.marker("file") or f".docs-test-block-{block.line}.py"
            (self.dir / name).write_text(code)
            code = f"python {name}\n"
        elif block.marker("file"):
            (self.dir / block.marker("file")).write_text(code)  # type: ignore[operator]
        return (f"set -euo pipefail\ncd {self.dir}\n[ -f {self.env_file} ] && . {self.env_file}\n"
                f"{code}\nexport -p > {self.env_file}.new && mv {self.env_file}.new {self.env_file}\n")

    def stop_servers(self) -> None:
        for proc, _ in self.servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.servers.clear()

    def run(self, block: Block) -> None:
        """Run one block; raise AssertionError (with its output) when it does not do what it says."""
        if block.marker("server") is not None:
            self._serve(block)
            return
        expected = int(block.marker("exit") or 0)
        r = subprocess.run(["bash", "-c", self.script(block)], cwd=self.dir, env=_env(), capture_output=True,
                           text=True, timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
        assert r.returncode == expected, (f"{block.id}: exit {r.returncode}, expected {expected}\n--- block\n"
                                          f"{self.code(block)}--- stdout\n{r.stdout[-4000:]}\n--- stderr\n"
                                          f"{r.stderr[-4000:]}")

    def _serve(self, block: Block) -> None:
        self.stop_servers()
        log = self.dir / f".docs-test-server-{block.line}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", self.script(block)], cwd=self.dir, env=_env(), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.servers.append((proc, log))
        ports = [int(self.ports.get(p, p)) for p in block.marker("server").replace(",", " ").split()]  # type: ignore[union-attr]
        deadline = time.monotonic() + SERVER_START_S
        waiting = list(ports)
        while waiting:
            if proc.poll() is not None:
                raise AssertionError(f"{block.id}: the server exited ({proc.returncode}) before port(s) {waiting} "
                                     f"answered\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{block.id}: port(s) {waiting} did not answer within {SERVER_START_S} s\n"
                                     f"{log.read_text()[-4000:]}")
            try:
                with socket.create_connection(("127.0.0.1", waiting[0]), timeout=1):
                    waiting.pop(0)
            except OSError:
                time.sleep(0.2)


class Pages:
    def __init__(self, root: Path, artifacts: Path) -> None:
        self.root, self.artifacts, self.runs = root, artifacts, {}  # type: ignore[var-annotated]

    def get(self, page: str) -> PageRun:
        if page not in self.runs:
            for other in self.runs.values():  # a page's servers stop when the next page starts
                other.stop_servers()
            d = self.root / re.sub(r"[^\w.-]", "_", page)
            d.mkdir()
            for name in LINKED:
                (d / name).symlink_to(ROOT / name)
            shutil.copytree(self.artifacts / "out", d / "out")
            shutil.copytree(self.artifacts / "my-qwen3", d / "my-qwen3")
            self.runs[page] = PageRun(page, d, {"8000": str(_free_port()), "8001": str(_free_port())})
        return self.runs[page]

    def close(self) -> None:
        for run in self.runs.values():
            run.stop_servers()


@pytest.fixture(scope="session")
def doc_pages(tmp_path_factory: pytest.TempPathFactory, doc_artifacts: Path):  # type: ignore[no-untyped-def]
    pages = Pages(tmp_path_factory.mktemp("docs_pages"), doc_artifacts)
    yield pages
    pages.close()


def _run_in_order(pages: Pages, block: Block) -> None:
    """Run ``block`` after the page's earlier blocks (those not run yet run first, as its set-up)."""
    run = pages.get(block.page)
    for earlier in (b for b in BLOCKS if b.page == block.page and b.line < block.line):
        if earlier.line in run.outcome:
            continue
        if earlier.skip_reason():
            run.outcome[earlier.line] = "skipped"
            continue
        try:
            run.run(earlier)
            run.outcome[earlier.line] = "ok"
        except AssertionError:
            run.outcome[earlier.line] = "failed"
    failed = [line for line, what in run.outcome.items() if what == "failed" and line < block.line]
    try:
        if failed:
            pytest.fail(f"{block.id}: an earlier block of the page failed first (line {failed[0]})")
        run.run(block)
        run.outcome[block.line] = "ok"
    except BaseException:
        run.outcome[block.line] = "failed"
        raise
    finally:
        if block is [b for b in BLOCKS if b.page == block.page][-1]:
            run.stop_servers()


# ---------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block(block: Block, doc_pages: Pages) -> None:
    reason = block.skip_reason()
    if reason:
        pytest.skip(f"{block.id}: {reason}")
    _run_in_order(doc_pages, block)


def test_pages_have_blocks_and_markers_are_known() -> None:
    """Collection itself: the docs exist, every page's blocks parse, and markers name known directives."""
    pages = {b.page for b in BLOCKS}
    assert {"docs/quickstart.md", "docs/serve.md", "docs/huggingface.md"} <= pages
    for b in BLOCKS:
        assert b.code.strip(), f"{b.id}: an empty block"
        if b.marker("exit") is not None:
            assert b.marker("exit").isdigit(), f"{b.id}: exit needs a number"  # type: ignore[union-attr]
        if b.marker("server") is not None:
            assert b.marker("server"), f"{b.id}: server needs its port(s)"


def test_parse_blocks_reads_markers_and_indented_fences(tmp_path: Path) -> None:
    md = tmp_path / "page.md"
    md.write_text("# t\n\n<!-- docs-test: skip why; exit 1 -->\n```bash\necho a\n```\n\n- item\n\n  ```python\n"
                  "  print(1)\n  ```\n\n```js\nno\n```\n")
    blocks = parse_blocks(md)
    assert [(b.line, b.lang, b.code) for b in blocks] == [(4, "bash", "echo a\n"), (10, "python", "print(1)\n")]
    assert blocks[0].markers == (("skip", "why"), ("exit", "1")) and blocks[1].markers == ()
    assert _parse_markers("skip a; b; exit 2", "here") == (("skip", "a; b"), ("exit", "2"))
    with pytest.raises(ValueError, match="unknown docs-test marker"):
        _parse_markers("skipp x", "here")


def test_the_readme_fits_a_page() -> None:
    """README.md is one page (at most 150 lines) and marks what its blocks need, as the docs pages do."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150, f"README.md: {len(text.splitlines())} lines (at most 150)"
    assert "docs-test:" in text


def test_cli_reference_renders_every_command() -> None:
    """The CLI reference is generated from the Typer app: every command's --help, options and all."""
    import typer.main

    from wmdeploy.cli import app

    spec = importlib.util.spec_from_file_location("_cli_reference", ROOT / "docs" / "_hooks" / "cli_reference.py")
    hook = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(hook)  # type: ignore[union-attr]
    text = hook.render()
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert len(commands) >= 10
    for name, cmd in commands.items():
        assert f"## wmdeploy {name}\n" in text and f"Usage: wmdeploy {name} " in text, name
        for param in cmd.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in text, f"{name}: {opt} is missing from the CLI reference"
    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert hook.MARKER in page and "wmdeploy export" not in page, "docs/reference/cli.md must stay generated"
    assert hook.on_page_markdown(page, None, None, None).count("## wmdeploy") == len(commands) + 1


def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: no broken link or anchor, no page missing from the nav, every docstring renders."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("the [docs] extra is not installed (pip install -e '.[docs]')")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                        "--site-dir", str(tmp_path / "site")], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()
