"""The docs run: every fenced Python and shell block of README.md, integrations/*/README.md and
docs/*.md is executed, on tiny settings, so the docs cannot drift from the code.

Conventions for the Markdown files (the line right above a fence, blank lines skipped):

* ```` ```python ```` and ```` ```bash ```` / ```` ```sh ```` / ```` ```shell ```` blocks are run;
  other languages (```` ```text ````, ```` ```yaml ````) are not.
* ``<!-- not run: REASON -->`` above a block: not run (installs packages, needs a GPU, runs for
  hours, shows another library's convention...). The reason is shown as the skip reason. Script
  paths the block names must still exist.
* ``<!-- slow: REASON -->`` above a block: run only when ``ZSHARP_DOCS_FULL=1``,
  skipped with the reason otherwise: the multi-process launches and long example runs, which cost
  a minute or more each on two cores and whose paths ``tests/test_hf.py``, ``tests/test_accelerate.py``,
  ``tests/test_composer.py`` and ``tests/test_lightning.py`` test anyway.
* ``<!-- continued -->`` above a Python block: it runs after the run blocks before it in the same
  file, back to the last block without the marker, in one process (so a section can build a model
  once and use it in several blocks).

How blocks run:

* Python: a block with the blocks it continues, in a fresh interpreter, in an empty temporary
  folder, with ``OMP_NUM_THREADS=1``; each block is compiled under its Markdown file's name and
  line numbers, so a traceback points at the line in the docs. Blocks importing an optional framework (Composer, transformers,
  accelerate, Lightning, timm, scikit-learn) are skipped, with the reason, where it is missing.
  Blocks should be small already: they are run as written.
* Shell: one command per line (``\\`` continues a line, ``#`` starts a comment), in order, in a
  temporary folder that links the checkout's ``integrations/``, ``yamls/`` and ``benchmarks/``,
  so relative output folders land there. The programs are this interpreter's (``python``, the
  console scripts beside it). ``TINY`` below shrinks each known command by appending arguments
  (argparse and ``HfArgumentParser`` keep the last value given), e.g. ``--max_steps 2`` for the
  HF scripts; ``make demo`` runs as ``zsharp-compare`` with those arguments, while ``make test``
  (this run), ``make test-latest`` and ``make wheel`` (``tests/test_packaging.py``) are left
  out (``COVERED``). Multi-process
  launchers get a free port. A command this file does not know fails the test: mark its block
  ``not run`` or teach ``tiny()`` about it.
* Blocks whose (shrunk) commands are the same as an earlier block's are run once.
* The jobs run two at a time (the machine's two cores), each test waiting for its own.

Local links in every file must point at existing files. The documentation site is built as
``make docs`` builds it (Sphinx, warnings as errors): the API reference is generated from the
docstrings, so the test checks that every public name has an entry there, that every Markdown file
above is a page of the site, and that the tables generated from the code are in their pages.

Deselect with ``-m "not docs"``.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from launch_env import clean_env, free_port

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "integrations").glob("*/README.md")), *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
SLOW = re.compile(r"<!--\s*slow:\s*(.+?)\s*-->")
FULL = os.environ.get("ZSHARP_DOCS_FULL") == "1"
CONTINUED = re.compile(r"<!--\s*continued\s*-->")
TIMEOUT = 600
BIN = Path(sys.executable).parent

#: top-level modules of the optional frameworks, and what a code block or a command needs of them
FRAMEWORK_OF = {
    "composer": "composer", "zsharp_algos.composer": "composer",
    "transformers": "transformers", "zsharp_algos.hf": "transformers",
    "accelerate": "accelerate", "zsharp_algos.accelerate_loop": "accelerate", "zsharp_algos.accelerate": "accelerate",
    "lightning": "lightning", "pytorch_lightning": "pytorch_lightning", "zsharp_algos.lightning": "lightning",
    "timm": "timm", "sklearn": "sklearn", "zsharp_algos.demo": "sklearn", "matplotlib": "matplotlib",
}


# --------------------------------------------------------------------------- parsing
@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    kind: str  # "python" or "shell"
    text: str
    skip: str | None = None
    slow: str | None = None
    continued: bool = False
    chain: list["Block"] = field(default_factory=list)  # the Python blocks run before this one

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(2).lower(), i
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        above = lines[k] if k >= 0 else ""
        if lang in RUN_LANGS:
            skip, slow = NOT_RUN.search(above), SLOW.search(above)
            blocks.append(Block(path, start + 1, RUN_LANGS[lang], "\n".join(lines[start + 1 : j]),
                                skip=skip.group(1) if skip else None, slow=slow.group(1) if slow else None,
                                continued=bool(CONTINUED.search(above))))
        i = j + 1
    chain: list[Block] = []
    for b in blocks:
        if b.kind != "python" or b.skip:
            continue
        if not b.continued:
            chain = []
        b.chain = list(chain)
        chain.append(b)
    return blocks


ALL_BLOCKS = [b for path in DOCS for b in parse_blocks(path)]


def commands(text: str) -> list[list[str]]:
    """The commands of a shell block as argv lists (continuations joined, comments dropped)."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


# --------------------------------------------------------------------------- tiny settings
HF_SCRIPTS = ("integrations/hf/train_digits.py", "integrations/hf/train_digits_classes.py")
HF_TINY = ["--max_steps", "2", "--train_subset", "64", "--per_device_eval_batch_size", "128", "--report_to", "none"]
COMPARE_TINY = ["--seeds", "1", "--epochs", "1", "--batch-size", "16", "--train-subset", "32", "--test-subset", "32",
                "--threads", "1", "--no-progress"]
ACCELERATE_TINY = ["--epochs", "1", "--max-steps", "2", "--batch-size", "32", "--train-subset", "64", "--no-progress"]
COMPOSER_TINY = ["data.batch_size=32", "data.train_subset=64", "data.test_subset=32"]
VARIANTS_TINY = ["--seeds", "1", "--variants", "zsharp"]


#: commands a block may hold that this file does not run, and where they are covered instead
COVERED = {
    ("make", "test"): "the run this test is part of",
    ("make", "test-latest"): "the same suite on the newest torch (.ci/run)",
    ("make", "wheel"): "tests/test_packaging.py",
}


def _script(argv: list[str]) -> str | None:
    """The repository script (``integrations/...``) a command runs, if any."""
    for a in argv:
        if a.endswith(".py") and ("/" in a):
            return a
    return None


def tiny(argv: list[str]) -> tuple[list[str], set[str]]:
    """``argv`` shrunk to a few steps, with the program resolved in this environment; and the
    frameworks it needs. Raises ``LookupError`` for a command this file does not know."""
    argv = list(argv)
    if argv[:2] == ["make", "demo"] and len(argv) == 2:
        argv = ["zsharp-compare"]
    prog = argv[0]
    script = _script(argv)
    needs: set[str] = set()
    if prog in ("python", "python3"):
        argv[0] = sys.executable
    elif prog in ("zsharp-compare", "zsharp-hf", "torchrun", "composer", "accelerate"):
        argv[0] = str(BIN / prog)
    else:
        raise LookupError(f"unknown program {prog!r}")
    if prog == "torchrun":
        argv[1:1] = ["--master_port", free_port()]
    elif prog == "composer":
        argv[1:1] = ["--master_port", free_port()]
    elif prog == "accelerate" and argv[1:2] == ["launch"]:
        argv[2:2] = ["--main_process_port", free_port()]

    if prog == "zsharp-compare":
        needs |= {"timm", "sklearn", "matplotlib"}
        argv += COMPARE_TINY
    elif script in HF_SCRIPTS or (script is None and "zsharp_algos.hf" in argv):
        needs |= {"transformers", "accelerate", "sklearn"}
        if script == "integrations/hf/train_digits_classes.py":
            needs.add("timm")
        argv += HF_TINY
    elif script == "integrations/hf/compare_variants.py":
        needs |= {"transformers", "accelerate", "sklearn", "timm"}
        extra = argv.index("--") if "--" in argv else None
        if extra is None:
            argv += VARIANTS_TINY + ["--"] + HF_TINY
        else:
            argv[extra:extra] = VARIANTS_TINY
            argv += HF_TINY
    elif script == "integrations/composer/train.py":
        needs |= {"composer", "timm", "sklearn"}
        given = [a for a in argv if a.startswith("trainer.max_duration=")]
        argv = [("trainer.max_duration=4ba" if a.startswith("trainer.max_duration=") else a) for a in argv]
        argv += COMPOSER_TINY + ([] if given else ["trainer.max_duration=2ba"])
    elif script == "integrations/accelerate/train.py":
        needs |= {"accelerate", "timm", "sklearn"}
        argv += ACCELERATE_TINY
    elif script == "integrations/lightning/train.py":
        needs |= {"lightning", "timm", "sklearn"}
        argv += ["--max-steps", "2", "--train-subset", "128", "--epochs", "1", "--no-progress"]
    else:
        raise LookupError(f"no tiny settings for {shlex.join(argv)!r}")
    return argv, needs


def _missing(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if importlib.util.find_spec(m) is None)


def python_needs(text: str) -> set[str]:
    needs = set()
    for node in ast.walk(ast.parse(text)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            for prefix, framework in FRAMEWORK_OF.items():
                if name == prefix or name.startswith(prefix + "."):
                    needs.add(framework)
    return needs


# --------------------------------------------------------------------------- running
def _env() -> dict[str, str]:
    env = clean_env()  # without the launcher variables earlier in-process launches left
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               PYTHONWARNINGS="ignore::DeprecationWarning", MPLBACKEND="Agg")
    env.pop("PYTHONPATH", None)
    return env


def _workdir(tmp_path: Path) -> Path:
    for name in ("integrations", "yamls", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


@dataclass
class Job:
    """What one test runs: a Python chain (the blocks of a ``continued`` run, in one process) or
    a shell block's commands; or why it does not run."""

    id: str
    blocks: list[Block]
    argvs: list[list[str]] = field(default_factory=list)
    skip: str | None = None
    error: str | None = None


def _python_job(chain: list[Block]) -> Job:
    job = Job(chain[0].id + (f"+{len(chain) - 1}" if len(chain) > 1 else ""), chain)
    code = "\n".join(b.text for b in chain)
    for b in chain:
        try:
            ast.parse(b.text)
        except SyntaxError as err:
            job.error = f"{b.id} is not valid Python ({err.msg}, its line {err.lineno}): mark it <!-- not run: a fragment -->"
            return job
    missing = _missing(python_needs(code))
    slow = [b.slow for b in chain if b.slow]
    if missing:
        job.skip = f"needs {', '.join(missing)}"
    elif slow and not FULL:
        job.skip = f"slow ({slow[0]}): runs with ZSHARP_DOCS_FULL=1"
    elif re.search(r"\.cuda\(\)|[\"']cuda[\"']", code):
        job.error = "uses CUDA: mark the block <!-- not run: needs a CUDA GPU -->"
    return job


def _shell_job(block: Block) -> Job:
    job = Job(block.id, [block])
    needs: set[str] = set()
    for argv in commands(block.text):
        if tuple(argv) in COVERED:
            continue
        try:
            run, need = tiny(argv)
        except LookupError as err:
            job.error = f"{err}; mark the block <!-- not run: reason --> or add it to tiny()"
            return job
        job.argvs.append(run)
        needs |= need
    missing = _missing(needs)
    if missing:
        job.skip = f"needs {', '.join(missing)}"
    elif block.slow and not FULL:
        job.skip = f"slow ({block.slow}): runs with ZSHARP_DOCS_FULL=1"
    elif not job.argvs:
        job.skip = "only commands covered elsewhere: " + "; ".join(COVERED[tuple(a)] for a in commands(block.text))
    return job


def plan() -> list[Job]:
    """One job per Python chain and per shell block, in file order; repeats marked as such."""
    jobs: list[Job] = []
    chains: list[list[Block]] = []
    for b in ALL_BLOCKS:
        if b.skip:
            continue
        if b.kind == "shell":
            jobs.append(_shell_job(b))
        elif b.chain:
            chains[-1].append(b)
        else:
            chains.append([b])
            jobs.append(None)  # placeholder: the chain is complete only after its last block
    it = iter(chains)
    jobs = [j if j is not None else _python_job(next(it)) for j in jobs]
    seen: dict[str, str] = {}
    for job in jobs:
        if job.skip or job.error:
            continue
        key = repr([[a for a in argv if not a.isdigit() or len(a) < 4] for argv in job.argvs])  # ports differ
        key = key if job.argvs else "\n".join(b.text for b in job.blocks)
        if key in seen:
            job.skip = f"same as {seen[key]}"
        else:
            seen[key] = job.id
    return jobs


JOBS = plan()
WORKERS = 2  # the machine's cores: each job is one process (OMP_NUM_THREADS=1), or a 2-process launch


def _run(job: Job, folder: Path) -> tuple[str, int, str]:
    """Run ``job`` in ``folder``; returns (what ran, exit code, the end of its output)."""
    folder.mkdir(parents=True)
    if job.argvs:
        cwd = _workdir(folder)
        for argv in job.argvs:
            try:
                done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                return shlex.join(argv), -1, f"timed out after {TIMEOUT} s"
            if done.returncode:
                return shlex.join(argv), done.returncode, done.stdout[-3000:] + done.stderr[-6000:]
        return "", 0, ""
    # The blocks run in one interpreter, each compiled under its file name with its own line
    # numbers, so a traceback points at the Markdown line.
    script = folder / "blocks.py"
    script.write_text(
        "import sys\n_g = {'__name__': '__main__'}\n"
        + "".join(f"exec(compile({chr(10) * b.line + b.text!r}, {str(b.path.relative_to(ROOT))!r}, 'exec'), _g)\n"
                  for b in job.blocks))
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=folder, env=_env(), capture_output=True, text=True,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return "python", -1, f"timed out after {TIMEOUT} s"
    return "python", done.returncode, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="session")
def runner(request, tmp_path_factory):
    """Starts every selected job at once, ``WORKERS`` at a time; each test waits for its own."""
    from concurrent.futures import ThreadPoolExecutor

    selected = [item.callspec.params["job"] for item in request.session.items
                if getattr(item, "callspec", None) and "job" in item.callspec.params]
    base = tmp_path_factory.mktemp("docs")
    pool = ThreadPoolExecutor(WORKERS)
    futures = {job.id: pool.submit(_run, job, base / re.sub(r"\W", "_", job.id))
               for job in selected if not (job.skip or job.error)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("job", JOBS, ids=[j.id for j in JOBS])
def test_block_runs(job: Job, runner):
    if job.error:
        pytest.fail(f"{job.id}: {job.error}")
    if job.skip:
        pytest.skip(job.skip)
    what, code, output = runner[job.id].result()
    if code:
        pytest.fail(f"{job.id}: {what} exited with {code}:\n{output}")


NOT_RUN_SHELL = [b for b in ALL_BLOCKS if b.skip is not None and b.kind == "shell"]


@pytest.mark.parametrize("block", NOT_RUN_SHELL, ids=[b.id for b in NOT_RUN_SHELL])
def test_not_run_commands_name_existing_files(block: Block):
    for argv in commands(block.text):
        for a in argv:
            if re.match(r"^(integrations|yamls|benchmarks|tests|docs)/[\w./-]+$", a) and "*" not in a:
                assert (ROOT / a).exists(), f"{block.id}: {a} does not exist"


def test_every_block_is_seen():
    """The parser finds the blocks (a broken fence would hide them all)."""
    readme = [b for b in ALL_BLOCKS if b.path.name == "README.md" and b.path.parent == ROOT]
    assert len(readme) >= 6
    assert all(b.kind == "python" for b in ALL_BLOCKS if b.continued)


# --------------------------------------------------------------------------- links
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_local_links_exist(path: Path):
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"


# --------------------------------------------------------------------------- the site
#: The modules whose ``__all__`` is the public API; each name must be documented in the site.
PUBLIC_MODULES = ["zsharp_algos", "zsharp_algos.two_pass", "zsharp_algos.hf", "zsharp_algos.composer",
                  "zsharp_algos.accelerate_loop", "zsharp_algos.lightning"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``make docs``'s build (warnings as errors, nitpicky) into a temporary folder: its HTML."""
    for module in ("sphinx", "myst_parser", "furo", "composer", "transformers", "accelerate", "lightning"):
        pytest.importorskip(module, reason=f"the documentation build needs {module} (the docs and all extras)")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", *SPHINX_FLAGS, "-d", str(out / "doctrees"), "-c", "docs", ".", str(out / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, f"sphinx-build failed:\n{done.stdout[-3000:]}\n{done.stderr[-8000:]}"
    return out / "html"


#: ``make docs``'s flags (the Makefile passes the same): warnings are errors, all of them reported,
#: every cross-reference must resolve.
SPHINX_FLAGS = ["-W", "--keep-going", "-n", "-q", "-b", "html"]


def test_make_docs_uses_the_tested_flags():
    makefile = (ROOT / "Makefile").read_text()
    assert " ".join(SPHINX_FLAGS[:3]) in makefile and "-c docs" in makefile


def test_site_documents_every_public_name(site: Path):
    """The API pages are generated from the docstrings: every name of the public modules'
    ``__all__`` has its own entry (an anchor with its dotted name), and every page of the README's
    reading list was built."""
    anchors = set()
    for page in (site / "docs" / "api").glob("*.html"):
        anchors |= set(re.findall(r'id="([\w.]+)"', page.read_text()))
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        missing += [f"{module_name}.{n}" for n in module.__all__ if f"{module_name}.{n}" not in anchors]
    assert not missing, f"not in the generated API reference: {missing}"
    for path in DOCS:
        built = site / path.relative_to(ROOT).with_suffix(".html")
        assert built.exists(), f"{path.relative_to(ROOT)} is not a page of the site"


def test_generated_tables_follow_the_code(site: Path):
    """The options, optimizers and refusals tables are built from the code, not copied."""
    from zsharp_algos.capabilities import ENTRY_POINTS
    from zsharp_algos.options import OPTIONS
    from zsharp_algos.registry import SHARPNESS_OPTIMIZERS

    methods = (site / "docs" / "methods.html").read_text()
    for name, option in OPTIONS.items():
        assert f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{name}</span></code>" in methods, name
    for name in SHARPNESS_OPTIMIZERS:
        assert f"<span class=\"pre\">{name}</span>" in methods, name
    support = (site / "docs" / "support.html").read_text()
    for entry in ENTRY_POINTS.values():
        assert entry.label.split()[0] in support, entry.label


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
