"""README's promises: its CPU example runs as written on a machine without a GPU, and its build
examples write where git ignores the outputs."""

import contextlib
import io
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_the_first_lines_are_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert block[0].startswith("pip install -e . && tvmflash demo")
    assert block[1].startswith('pip install -e ".[test,torch]" && python -m pytest -q -n auto --dist loadfile')
    assert len(README.encode()) <= 12 * 1024, f"README is {len(README.encode())} bytes"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    command = re.search(r"```bash\n.*?\n(.*?)\s+#", README, re.S).group(1).strip()
    assert command.replace("pip install", "pip install -q") in ci


def test_the_cpu_example_runs_as_written(tmp_path, monkeypatch):
    example = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "np.random" in b)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example, "README.md", "exec"), {})
    shapes, err = printed.getvalue().rsplit(" ", 1)
    assert shapes == "(1, 100, 4, 64) (1, 4, 100)" and float(err) < 4e-3


def test_build_examples_write_where_git_ignores():
    """README's build example wrote out/ into the repository, its .json and .cu not ignored."""
    outputs = set(re.findall(r"tvmflash (?:build|demo)[^\n`]* (?:-o|--output) (\S+)", README))
    assert outputs, "README has a build example"
    for out in outputs:
        if out.startswith(("/", "~", "$")):
            continue
        for ext in (".so", ".json", ".cu", ".lock"):
            probe = Path(out.rstrip("/")) / f"fwd_f16_d128_causal_g4_sm80{ext}"
            res = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=REPO)
            assert res.returncode == 0, f"README writes {probe} into the repository and git does not ignore it"
