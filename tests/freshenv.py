"""A fresh virtual environment with the project pip-installed into it, for install tests.

To save minutes, the new environment reuses the test environment's installed dependencies:
a `.pth` file appends the enclosing site-packages to its path. A path line in a `.pth` file
does not run the `.pth` files found in that folder, so the enclosing environment's own install
of this project (and its hook) stays invisible: only what `pip install` put into the fresh
environment registers the extension.
"""
import hashlib
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What the install needs is the source: no environments (CI's .ci/run makes .venv in the checkout,
# several GB), wheels, results or the pipeline's work folders.
_COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "build", "*.egg-info", "results",
                                      ".pytest_cache", ".whl", ".venv", "nnunet_demo*", "nnunet_data",
                                      "work_dirs", "demo_run", "venv")


class FreshEnv:
    def __init__(self, root: Path, editable: bool):
        self.root = Path(root)
        self.python = self.root / "venv" / "bin" / "python"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.root / "venv")], check=True)
        self.site_packages = Path(self.run_python(
            "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
        enclosing = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
        (self.site_packages / "_enclosing_env.pth").write_text("\n".join(dict.fromkeys(enclosing)) + "\n")
        # Install from a copy, so a build leaves nothing in the working tree.
        self.source = self.root / "src"
        shutil.copytree(PROJECT_ROOT, self.source, ignore=_COPY_IGNORE)
        self.pip("install", "--no-deps", "--no-build-isolation", *(["-e"] if editable else []), str(self.source))

    def env(self, **extra) -> dict:
        # TRITON_INTERPRET (set by conftest for the kernel tests) would send a user's training
        # loss through Triton's interpreter: tens of times slower on a CPU.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET")}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def pip(self, *args) -> subprocess.CompletedProcess:
        return self.run_python("-m", "pip", "-q", "--disable-pip-version-check", *args, code=False)

    def run_python(self, *args, code=True, check=True, **env) -> subprocess.CompletedProcess:
        argv = [str(self.python)] + (["-c", *args] if code else list(args))
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env(**env), cwd=self.root)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv[:4]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def console_script(self, name: str, *args, check=True, **env) -> subprocess.CompletedProcess:
        """Run an installed console script (nnUNetv2_train, nnunet-heart, ...) with this
        environment's interpreter: the same entry-point function the script would call."""
        code = ("import sys; from importlib.metadata import entry_points;"
                f"(ep,) = entry_points(group='console_scripts', name={name!r});"
                f"sys.argv = [{name!r}] + sys.argv[1:]; sys.exit(ep.load()())")
        return self.run_python(code, *map(str, args), check=check, **env)


def tree_digest(folder: Path) -> dict:
    """sha256 of every file under `folder`, bytecode caches aside (Python writes those on import)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and "__pycache__" not in p.parts}
