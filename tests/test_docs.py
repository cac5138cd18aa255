"""Every pointer in the repository's text leads somewhere a reader who has only this folder can follow.

Scans the text files git knows (tracked, or new and not ignored: *.py, *.md, *.txt, .ci/run) and fails on
- a reference to the private design note the code was first written from (it is not in the repository:
  cite METHOD.md, the paper, or the reference code instead);
- a reference to a repository file (`model.py`, `tests/test_eval.py`, `README.md`) that does not exist;
- a section pointer `METHOD.md §N` / `§N.M` whose number is not a heading of METHOD.md (a bare `§N` means
  METHOD.md too; inside METHOD.md that is the only form).
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = (".venv/", "demo/", "runs/", ".git/", ".ci/venv/", ".pytest_cache/")
PRIVATE_NOTE = "S" + "PEC"  # spelled in two parts so that this file does not trip its own check

PRIVATE = re.compile(r"\bS[P]EC\b")
# a file name with a repository extension, optionally with folders; not the tail of a longer path or URL
FILE_REF = re.compile(r"(?<![\w./\\-])((?:[\w.-]+/)*[\w-]+\.(?:py|md)|requirements[\w-]*\.txt|\.ci/run)(?![\w/-])")
# names that look like repository files but are not
NOT_OURS = {
    "vqaEval.py": "the official VQA v2 evaluation script",
    "metrics.py": "the official NLVR2 evaluation script (its repository's nlvr2/eval folder)",
    "ddp_run.py": "written by tests/test_train.py into its temporary folder",
    "recording.py": "written by tests/test_shards.py into its temporary folder",
    "driver.py": "written by tests/test_exit.py into its temporary folder",
    "slow_validation.py": "written by tests/test_gpu_ready.py into its temporary folder",
    "train_with_sigint.py": "written by tests/test_round3.py into its temporary folder",
}
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
WRONG_FORM = re.compile(r"\bMETHOD(?:\.md)?,?\s+(?:[Ss]ection|[Ss]ec\.?)\s*\d|\bMETHOD\s+§\s?\d")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)


def text_files():
    """Paths relative to ROOT (posix) of the files to scan."""
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # a copy of the folder without git: walk it
        names = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")]
    return sorted(n for n in names if not n.startswith(SKIP) and (ROOT / n).is_file()
                  and (n.endswith((".py", ".md", ".txt")) or n == ".ci/run"))


def sections_of(method_text):
    """Section numbers of METHOD.md's headings: '## 6. Losses' -> '6', '### 6.4 MVSC' -> '6.4'."""
    return set(HEADING.findall(method_text))


def file_exists(ref, path):
    """A reference resolves against the repository root or the folder of the file that makes it."""
    return (ROOT / ref).exists() or (ROOT / path).parent.joinpath(ref).exists()


def problems(text, path, sections, exists=file_exists):
    """-> ['path:line: what is wrong', ...] for one file's text."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{path}:{n}"
        if PRIVATE.search(line):
            out.append(f"{where}: cites the private design note ({line.strip()[:80]!r}); point at METHOD.md §N")
        for ref in FILE_REF.findall(line):
            if ref not in NOT_OURS and not exists(ref, path):
                out.append(f"{where}: refers to {ref}, which is not in the repository")
        if WRONG_FORM.search(line):
            out.append(f"{where}: write section pointers as 'METHOD.md §N' ({line.strip()[:80]!r})")
        for number in SECTION.findall(line):
            if number not in sections:
                out.append(f"{where}: METHOD.md has no section §{number}")
    return out


def test_repository_pointers_resolve():
    method = ROOT / "METHOD.md"
    sections = sections_of(method.read_text(encoding="utf-8")) if method.exists() else set()
    files = text_files()
    assert "README.md" in files and "model.py" in files  # the scan sees the repository
    found = [p for f in files for p in problems((ROOT / f).read_text(encoding="utf-8"), f, sections)]
    assert not found, f"{len(found)} broken pointers:\n" + "\n".join(found)


def test_sections_of_reads_the_heading_numbers():
    text = "# Title\n## 1. Shapes\n### 1.2 Names\ntext ## 3. not a heading\n## 10. Differences\n#### 6.4.1 Deep\n"
    assert sections_of(text) == {"1", "1.2", "10", "6.4.1"}


def test_checker_catches_each_kind_of_broken_pointer():
    sections = {"1", "6", "6.4", "10"}

    def check(line):
        ours = ("METHOD.md", "model.py", "tests/test_eval.py")
        return problems(line, "notes.txt", sections, exists=lambda ref, path: ref in ours)

    # the private note, however it is cited
    assert check(f"# see {PRIVATE_NOTE} 6.4") and check(f"({PRIVATE_NOTE} section 9)") and check(f"{PRIVATE_NOTE}.md")
    assert not check("inspect the spec of the module; SPECIAL, SPECS")  # other words are fine
    # file references
    assert not check("see `model.py` and tests/test_eval.py; `vqaEval.py` is the official script")
    assert check("see `nothere" + ".py`") and check("as in tests/test_nothere" + ".py")
    assert not check("torch.nn.functional and https://example.org/a/b" + ".py are not files of ours")
    # section numbers: bare and prefixed, at the end of a sentence too
    assert not check(f"(METHOD.md §{6}.4) and §{10}; as METHOD.md §{6}. says")
    assert check(f"METHOD.md §{6}.5") == [f"notes.txt:1: METHOD.md has no section §{6}.5"]
    assert check(f"see §{2}") and check(f"METHOD.md §{6}.4.1")
    # the one form
    assert check(f"METHOD.md section {6}") and check(f"METHOD §{6}")
    # line numbers count from 1
    assert check("fine\n" + f"METHOD.md §{7}")[0].startswith("notes.txt:2:")


def test_not_ours_names_really_are_not_repository_files():
    for name in NOT_OURS:
        assert not (ROOT / name).exists() and not (ROOT / "tests" / name).exists(), name


def test_walks_the_folder_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise OSError("git not found")
    monkeypatch.setattr(subprocess, "run", no_git)
    files = text_files()
    assert "README.md" in files and "tests/test_docs.py" in files
    assert not any(f.startswith((".venv/", "demo/", "runs/")) for f in files)
    assert all(os.path.splitext(f)[1] in (".py", ".md", ".txt") or f == ".ci/run" for f in files)


# the README's reading order: a table row of a file, a function or class in it, and its first-last lines
READING_ROW = re.compile(r"^\| `(\w+\.py)` \| `([\w.]+)` \| (\d+)-(\d+) \|", re.M)


def span(path, qualname):
    """(first, last) line of a top-level or nested def/class, decorators included."""
    nodes = ast.parse(path.read_text(encoding="utf-8")).body
    for part in qualname.split("."):
        node = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        assert node is not None, f"{path.name} has no {qualname}"
        nodes = node.body
    return min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno


def test_reading_order_names_the_lines_of_the_code():
    """Each row of the README's "Reading one pre-training step" is where that function is now."""
    rows = READING_ROW.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(rows) >= 10, "the README lost its reading order"
    wrong = [f"{f} {name}: README says {a}-{b}, the code is at {'-'.join(map(str, span(ROOT / f, name)))}"
             for f, name, a, b in rows if span(ROOT / f, name) != (int(a), int(b))]
    assert not wrong, "\n".join(wrong)


def test_span_finds_methods_and_decorators(tmp_path):
    path = tmp_path / ("m" + ".py")
    path.write_text("import x\n\n\n@dataclass\nclass A:\n    def f(self):\n        return 1\n")
    assert span(path, "A") == (4, 7) and span(path, "A.f") == (6, 7)


def test_importing_train_loads_only_what_a_run_needs():
    """`import train` does not load the pictures, the grounding score, the demo writer or the converters: the
    command lines import them where they use them (and data.py imports no file of ours at all)."""
    code = ("import sys; sys.path.insert(0, {root!r}); import train, data; "
            "print(' '.join(m for m in ('pictures', 'grounding', 'demo', 'convert', 'prepare_data') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT))], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", out
    ours = {p.stem for p in ROOT.glob("*.py")}
    imported = set(re.findall(r"^(?:from|import) (\w+)", (ROOT / "data.py").read_text(encoding="utf-8"), re.M))
    assert not imported & ours, imported & ours
