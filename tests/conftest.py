import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_method(name):
    """Imports methods/<name>.py as a module (its __main__ block does not run)."""
    spec = importlib.util.spec_from_file_location(f"method_{name}", os.path.join(ROOT, "methods", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_method(script, *args, cwd=None, check=True):
    """Runs a method file as a user would; returns the CompletedProcess (stdout+stderr text)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "CLEANFLOW_CACHE": os.environ.get("CLEANFLOW_CACHE", os.path.join(ROOT, ".cache"))}
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def method_path():
    return lambda name: os.path.join(ROOT, "methods", f"{name}.py")
