"""The documentation stays in step with the code: README's quick start with CI, its model table with the model
tests, docs/design.md's sections with the references to them, its targets with the benchmark suite. Pure text
and AST reading: fast, no kernel runs."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DESIGN = REPO / "docs" / "design.md"
CI = REPO / ".ci" / "run"
# The files whose tests build tiny models and compare the patched model with PEFT or a hand-written oracle: the
# families they build are the ones README's table lists (tests/hf_models.py holds the shared builders).
MODEL_CHECK_FILES = ("hf_models.py", "test_integration_encoders.py", "test_integration_decoders.py",
                     "test_integration_seq2seq.py", "test_integration_deberta.py", "test_integration_adapters.py",
                     "test_op_softcap_sinks.py", "test_integration_mla.py")
TEXT_SUFFIXES = {".py", ".md", ".h", ".cuh", ".cu", ".cpp", ".toml", ".cfg", ".in", ".txt", ""}


def section(text: str, begin: str, end: str) -> str:
    assert begin in text, f"{begin!r} missing"
    start = text.index(begin) + len(begin)
    assert end in text[start:], f"{end!r} missing after {begin!r}"
    return text[start:text.index(end, start)]


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``markdown``, as lists of stripped cells."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in rows]
    return [row for row in cells[2:]]  # after the header and the |---| line


def repository_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split()
        files = [REPO / n for n in names]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = [p for p in REPO.rglob("*") if ".git" not in p.parts]
    return [p for p in files if p.is_file() and p.suffix in TEXT_SUFFIXES and "results" not in p.parts]


# ----------------------------------------------------------------------------------------------------------------
# docs/design.md and the references to it
# ----------------------------------------------------------------------------------------------------------------

def design_sections() -> dict:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^## (\d+)\. (.+)$", DESIGN.read_text(), re.M)}


def test_nothing_refers_to_a_design_file_outside_docs():
    missing = "DESIGN" + ".md"  # spelled apart so that this file does not match itself
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in repository_text_files()
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if missing in line]
    assert not offenders, f"references to {missing}, which does not exist (use docs/design.md §N): {offenders}"


def test_references_to_design_sections_exist():
    sections = design_sections()
    assert sorted(sections) == list(range(1, len(sections) + 1)) and len(sections) >= 6
    found = []
    for path in repository_text_files():
        for number in re.findall(r"docs/design\.md §(\d+)", path.read_text(errors="replace")):
            found.append((path.relative_to(REPO), int(number)))
    assert found, "nothing cites a section of docs/design.md"
    bad = [(str(p), n) for p, n in found if n not in sections]
    assert not bad, f"references to sections docs/design.md does not have (it has {sorted(sections)}): {bad}"
    # The numbers the code cites mean what they say.
    assert "op" in sections[4].lower() and "correctness" in sections[5].lower() \
        and "performance" in sections[6].lower()


def test_design_targets_match_the_benchmark_suite():
    from benchmarks import report, workloads

    rows = {row[0]: row for row in table_rows(section(DESIGN.read_text(), "<!-- targets:begin -->",
                                                      "<!-- targets:end -->"))}
    assert list(rows) == list(workloads.TARGETS), "docs/design.md's targets and workloads.TARGETS differ"
    suites = [w for full in ("quick", "full") for gpu in (True, False) for w in workloads.suite(full, gpu=gpu)]
    for target, row in rows.items():
        text = " ".join(row)
        tagged = [w for w in suites if target in w.targets]
        assert ("not yet" in row[-1]) == (not tagged), f"{target}: 'measured by' says {row[-1]!r}"
        for w in [w for w in workloads.suite("quick", gpu=True) if target in w.targets]:
            assert w.group in row[-1], f"{target}: its workload group {w.group} is not named"
            for label, value in (("B", w.batch), ("N", w.seq_len), ("P", w.prefix_len)):
                assert f"{label}={value}" in text, f"{target}: {label}={value} of {w.name} is not in {text!r}"
            if w.kind in workloads.KERNEL_KINDS:
                assert f"D={w.head_dim}" in text, f"{target}: D={w.head_dim} of {w.name} is not in {text!r}"
    for name, bound in report.BOUNDS.items():
        target = name.split()[0]
        shown = f"{bound:g}"
        assert shown in " ".join(rows[target]), f"{name}'s bound {shown} is not in docs/design.md's {target} row"


def test_design_states_the_correctness_bound_the_code_uses():
    from benchmarks import check

    text = design_sections()[5]
    body = DESIGN.read_text().split("## 5. ")[1].split("## 6. ")[0]
    assert text and f"({check.ERROR_MULTIPLE:g}×)" in body and f"{check.FLOOR_ULPS:g} units" in body


# ----------------------------------------------------------------------------------------------------------------
# README: quick start and CI, the model families
# ----------------------------------------------------------------------------------------------------------------

def quick_start_commands() -> list[str]:
    text = section(README.read_text(), "## Quick start", "\n## ")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert len(blocks) == 2, f"the quick start must have exactly two commands, found {len(blocks)} blocks"
    for block in blocks:
        assert len(block.strip().splitlines()) == 1, f"each command is one line to paste: {block!r}"
    return [b.strip() for b in blocks]


def steps(line: str) -> list[list[str]]:
    return [shlex.split(part) for part in line.split("&&")]


def test_quick_start_has_the_main_job_and_the_tests():
    main, tests = quick_start_commands()
    main_steps, test_steps = steps(main), steps(tests)
    assert main_steps[0] == ["pip", "install", "torch"] == test_steps[0]
    assert ["pip", "install", "--no-build-isolation", "-e", ".[bench]"] in main_steps
    assert main_steps[-2:] == [["python", "-m", "ptv2_kernels"], ["python", "benchmarks/run.py"]]
    assert ["pip", "install", "--no-build-isolation", "-e", ".[test]"] in test_steps
    assert test_steps[-1][:4] == ["python", "-m", "pytest", "tests/"]
    assert main_steps[:2] == test_steps[:2], "both commands set up the same way"


def test_ci_runs_the_readme_test_command():
    """.ci/run installs the way the test quick start says and runs its test command (plus the self-check)."""
    lines = CI.read_text().split("# README.md's test quick start:", 1)[1].splitlines()
    ci_steps = []
    for line in lines:
        if line.startswith("stage "):
            words = shlex.split(line)[2:]  # drop `stage "NAME"`
            if words[0] == "install_package":
                words = ["pip", "install"] + words[1:]
            elif words[0] == "run_tests":
                words = words[1:]
            ci_steps.append(words)
    readme_steps = steps(quick_start_commands()[1])
    assert readme_steps[-1] in ci_steps, f".ci/run never runs {readme_steps[-1]}: {ci_steps}"
    through_tests = ci_steps[:ci_steps.index(readme_steps[-1]) + 1]
    self_check = ["python", "-m", "ptv2_kernels"]  # CI runs it before the tests; the quick start leaves it out
    assert [s for s in through_tests if s != self_check] == readme_steps, \
        f".ci/run runs {through_tests}, README's test command is {readme_steps}"


def families_the_model_tests_check() -> set:
    """transformers model types of the config classes that the model-checking test files build."""
    transformers = pytest.importorskip("transformers")
    names = set()
    for name in MODEL_CHECK_FILES:
        for node in ast.walk(ast.parse((REPO / "tests" / name).read_text())):
            if isinstance(node, ast.Attribute):
                candidate = node.attr
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                candidate = node.value
            else:
                continue
            if re.fullmatch(r"[A-Z]\w*Config", candidate):
                names.add(candidate)
    types = set()
    for name in names:
        config = getattr(transformers, name, None)
        if getattr(config, "model_type", ""):  # peft's configs and GenerationConfig are not model families
            types.add(config.model_type)
    return types


def test_readme_model_table_lists_the_families_the_tests_check():
    table = section(README.read_text(), "<!-- model-families:begin -->", "<!-- model-families:end -->")
    listed = [row[0].strip("`") for row in table_rows(table)]
    assert len(listed) == len(set(listed)), f"a family is listed twice: {listed}"
    tested = families_the_model_tests_check()
    assert {"bert", "llama", "t5"} <= tested, f"reading the model tests went wrong: {tested}"
    assert set(listed) == tested, (f"README lists {sorted(set(listed) - tested)} that no model test checks, and "
                                   f"misses {sorted(tested - set(listed))} that the tests check")


def test_readme_links_the_docs_and_shows_freeze_backbone():
    text = README.read_text()
    assert "(docs/integration.md)" in text and "(docs/design.md)" in text
    assert "PTV2_SKIP_CUDA_BUILD=1" in section(text, "## Quick start", "\n## ")
    example = section(text, "## P-Tuning v2 modules and model patching", "### Supported model families")
    assert "freeze_backbone(model)" in example
    from ptv2_kernels.integrations import hf_transformers

    assert "train_head" in hf_transformers.freeze_backbone.__code__.co_varnames
