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

The API reference section of README.md is checked against the code: every documented name
imports, and each documented signature has the code's argument names and defaults (both ways,
unless the signature starts with ``...``: then only the documented ones; a default written
``...`` is not compared); ``- `.member` ``
bullets must exist on the class. Local links in every file must point at existing files.

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
    assert len(readme) >= 10
    assert all(b.kind == "python" for b in ALL_BLOCKS if b.continued)


# --------------------------------------------------------------------------- links
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_local_links_exist(path: Path):
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"


# --------------------------------------------------------------------------- the API reference
@dataclass
class Entry:
    name: str  # dotted import path
    signature: str | None
    members: list[str]
    line: int


def api_entries() -> list[Entry]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## API reference", 1)[1].split("\n## ", 1)[0]
    offset = text[: text.index("\n## API reference")].count("\n") + 1
    entries: list[Entry] = []
    for i, line in enumerate(section.splitlines()):
        m = re.match(r"^####\s+`([\w.]+)`\s*$", line)
        if m:
            entries.append(Entry(m.group(1), None, [], offset + i + 1))
            continue
        if not entries:
            continue
        entry = entries[-1]
        short = entry.name.rsplit(".", 1)[1]
        if entry.signature is None and not entry.members and line.startswith(f"`{short}("):
            entry.signature = line[1:].split("`", 1)[0]
        if line.startswith("- "):
            head = line.split("`:", 1)[0] + "`"  # the code spans before the description
            entry.members += [name + args for name, args in re.findall(r"`\.(\w+)(\([^`]*\))?`", head)]
    return entries


API = api_entries()


def _import(dotted: str):
    for prefix, framework in FRAMEWORK_OF.items():
        if prefix.startswith("zsharp_algos.") and (dotted == prefix or dotted.startswith(prefix + ".")):
            if importlib.util.find_spec(framework) is None:
                pytest.skip(f"{prefix} needs {framework}")
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        framework = FRAMEWORK_OF.get(module_name)
        if framework and importlib.util.find_spec(framework) is None:
            pytest.skip(f"{module_name} needs {framework}")
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                continue
            raise
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


KEYWORD_ONLY_DOCUMENTED: set[tuple[str, str]] = set()


def _documented(signature: str) -> tuple[dict[str, object], bool, bool]:
    """Documented arguments -> default (``inspect.Parameter.empty`` when none), whether the
    signature is partial (starts with ``...``), whether it has ``**kwargs``."""
    inner = signature[signature.index("(") + 1 : signature.rindex(")")].strip()
    partial = inner.startswith("...")
    if partial:
        inner = inner[3:].lstrip(", ")
    fn = ast.parse(f"def f({inner}): pass").body[0].args
    out: dict[str, object] = {}
    positional = fn.posonlyargs + fn.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(fn.defaults)) + list(fn.defaults)
    for a, d in zip(positional, defaults):
        out[a.arg] = d
    for a, d in zip(fn.kwonlyargs, fn.kw_defaults):
        out[a.arg] = inspect.Parameter.empty if d is None else d
        KEYWORD_ONLY_DOCUMENTED.add((signature, a.arg))
    for name, value in list(out.items()):
        if isinstance(value, ast.AST):
            try:
                out[name] = ast.literal_eval(value)
            except ValueError:
                out[name] = ast.unparse(value)
    return out, partial, fn.kwarg is not None


KINDS: dict[tuple[int, str], object] = {}


def _actual(obj) -> tuple[dict[str, object], set[str], dict[str, object]]:
    """The code's arguments -> default, for a function or a class: its ``__init__`` and, while it
    forwards ``**kwargs``, its bases' within this package; the names the class's own ``__init__``
    takes; and the sharpness options it takes as keyword arguments (``obj.options``, or every
    option of :mod:`zsharp_algos.options` where ``**kwargs`` reach no signature that names them,
    as in the callbacks that pass them on to an optimizer)."""
    targets = [obj]
    declared = inspect.isclass(obj) and any("__signature__" in vars(c) for c in obj.__mro__)
    if inspect.isclass(obj) and not hasattr(obj, "__dataclass_fields__") and not declared:
        inits = [vars(c)["__init__"] for c in obj.__mro__
                 if "__init__" in vars(c) and c.__module__.startswith("zsharp_algos")]
        targets = inits or [obj]
    params: dict[str, object] = {}
    own: set[str] = set()
    forwards = False
    for i, target in enumerate(targets):
        forwards = False
        try:
            signature = inspect.signature(target)
        except ValueError:  # a builtin's (Exception subclasses without an __init__ of their own)
            break
        for p in signature.parameters.values():
            if p.name == "self" or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                forwards = True
                continue
            params.setdefault(p.name, p.default)
            KINDS.setdefault((id(obj), p.name), p.kind)
            if i == 0:
                own.add(p.name)
        if not forwards:
            break
    options = {}
    if inspect.isclass(obj):
        table = getattr(obj, "options", None)
        if not isinstance(table, (tuple, list)):
            table = getattr(getattr(obj, "optimizer_cls", None), "options", ())
        options = {o.name: o.default for o in table}
    if forwards and not options:
        from zsharp_algos.options import OPTIONS

        options = {name: o.default for name, o in OPTIONS.items()}
        return params, own, {**options, "__open__": True}
    return params, own, options


def _same(a, b) -> bool:
    if isinstance(b, str) and not isinstance(a, str):
        if getattr(a, "__name__", None) == b.rsplit(".", 1)[-1]:  # a class or function, by name
            return True
        if hasattr(a, "value"):  # str enums
            a = a.value
    return a == b or (isinstance(a, float) and isinstance(b, (int, float)) and float(b) == a)


@pytest.mark.parametrize("entry", API, ids=[e.name for e in API])
def test_api_reference_matches_code(entry: Entry):
    obj = _import(entry.name)
    for member in entry.members:
        name = member.split("(")[0]
        assert hasattr(obj, name) or name in getattr(obj, "__dataclass_fields__", {}) or (
            inspect.isclass(obj) and name in inspect.signature(obj).parameters
        ) or _instance_attribute(obj, name), f"README line {entry.line}: {entry.name} has no member {name!r}"
        if "(" in member and callable(getattr(obj, name, None)):
            documented, _, _ = _documented(name + member[len(name):])
            actual = inspect.signature(getattr(obj, name)).parameters
            actual_names = [p for p in actual if p != "self" and actual[p].kind not in (inspect.Parameter.VAR_KEYWORD,
                                                                                         inspect.Parameter.VAR_POSITIONAL)]
            assert list(documented) == actual_names, f"README line {entry.line}: {entry.name}.{name}{member[len(name):]}"
    if entry.signature is None:
        return
    documented, partial, documented_kwargs = _documented(entry.signature)
    actual, own, options = _actual(obj)
    for name, default in documented.items():
        if name in actual:
            have = actual[name]
        elif name in options:
            have = options[name]
        else:
            pytest.fail(f"README line {entry.line}: {entry.name} documents {name!r}, the code has no such argument "
                        f"(it has {sorted(actual) + sorted(options)})")
        kind = KINDS.get((id(obj), name))
        if kind is not None:
            keyword_only = (entry.signature, name) in KEYWORD_ONLY_DOCUMENTED
            assert keyword_only == (kind is inspect.Parameter.KEYWORD_ONLY), (
                f"README line {entry.line}: {entry.name}: {name!r} is "
                f"{'keyword-only' if kind is inspect.Parameter.KEYWORD_ONLY else 'positional'} in the code")
        # a documented default of ``...`` is one the prose explains (it depends on the environment)
        if default is not inspect.Parameter.empty and default is not Ellipsis and have is not inspect.Parameter.empty:
            assert _same(have, default), f"README line {entry.line}: {entry.name}({name}=...) is {have!r} in the code, {default!r} in the README"
    if not partial:
        # options need not be listed where the entry says they pass through (``**options``)
        listed = [] if options.get("__open__") or documented_kwargs else [n for n in options if n != "__open__"]
        own = [n for n in own if not (documented_kwargs and n in options)]
        undocumented = list(dict.fromkeys(n for n in [*own, *listed] if n not in documented))
        assert not undocumented, f"README line {entry.line}: {entry.name} does not document {undocumented}"


def _instance_attribute(cls, name: str) -> bool:
    """Whether ``__init__`` of ``cls`` (or a base in this package) assigns ``self.<name>``."""
    if not inspect.isclass(cls):
        return False
    for c in cls.__mro__:
        if c.__module__.startswith("zsharp_algos") and "__init__" in vars(c):
            try:
                source = inspect.getsource(c.__init__)
            except (OSError, TypeError):
                continue
            if re.search(rf"self\.{name}\s*(:[^=]*)?=", source):
                return True
    return False


def test_api_reference_covers_the_public_names():
    """Every name in ``__all__`` of the public modules has an entry."""
    documented = {e.name for e in API}
    modules = ["zsharp_algos", "zsharp_algos.two_pass", "zsharp_algos.hf", "zsharp_algos.composer",
               "zsharp_algos.accelerate_loop", "zsharp_algos.lightning"]
    missing = []
    for module_name in modules:
        framework = FRAMEWORK_OF.get(module_name)
        if framework and importlib.util.find_spec(framework) is None:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue  # not written yet
            raise
        public = [n for n in getattr(module, "__all__", []) if not n.isupper() and not n.startswith("_")]
        missing += [f"{module_name}.{n}" for n in public if f"{module_name}.{n}" not in documented]
    assert not missing, f"not in the README's API reference: {missing}"
