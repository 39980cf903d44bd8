"""README's two commands for a fresh machine are what CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_install_and_test_commands_readme_shows():
    readme = (ROOT / "README.md").read_text()
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.startswith(("python3 -m venv", "python -m pytest"))]
    assert len(ci_commands) == 2
    install, test = ci_commands
    assert f"\n{install} && bash ensemble_pipeline.sh --demo\n" in readme  # the main-job command
    assert f"\n{test}\n" in readme
