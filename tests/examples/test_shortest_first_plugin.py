"""The example plugin package, pip-installed into a fresh virtual environment, is found and drives generation."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shortest-prompt-first"


def _venv_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def test_example_scheduler_plugin_installs_lists_and_generates(tmp_path: Path) -> None:
    # A fresh venv that sees this environment's packages (ernie-serve, torch) through a .pth file, so the test
    # installs only the example package, as a user would: pip install ./examples/shortest-prompt-first.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = _venv_python(env_dir)
    inner_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    outer_site = sysconfig.get_paths()["purelib"]
    Path(inner_site, "outer_env.pth").write_text(f"import site; site.addsitedir({outer_site!r})\n")

    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr

    env = {**os.environ, "ERNIE_SERVE_PLUGINS": "shortest-first"}
    listing = subprocess.run(
        [python, "-m", "ernie_serve.cli", "plugins"], capture_output=True, text=True, env=env, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    # the scheduler with its distribution, version and entry point; the plugin loaded after the built-ins
    assert "  shortest-first  ernie-serve-shortest-first 0.1.0 [shortest-first]" in lines
    plugins_at = next(i for i, line in enumerate(lines) if line.startswith("Plugins ")) + 1
    assert [line.split()[0] for line in lines[plugins_at:]] == [
        "ernie45",
        "llguidance",
        "onnx",
        "schedulers",
        "tensorrt",
        "torch",
        "web_search",
        "shortest-first",
    ]

    script = (
        "from ernie_serve import LLM, SamplingParams\n"
        "llm = LLM(model='demo', scheduler='shortest-first')\n"
        "assert type(llm.engine.core.scheduler).__name__ == 'ShortestPromptFirstScheduler'\n"
        "outs = llm.generate(['a much longer prompt than the other one', 'hi'],"
        " SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))\n"
        "print([len(o.outputs[0].token_ids) for o in outs])\n"
    )
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[4, 4]"

    # without it in the allowlist, the scheduler is unknown and the error lists what exists
    hidden = subprocess.run(
        [python, "-c", "from ernie_serve import LLM; LLM(scheduler='shortest-first')"],
        capture_output=True,
        text=True,
        env={**os.environ, "ERNIE_SERVE_PLUGINS": ""},
        timeout=300,
    )
    assert hidden.returncode != 0 and "shortest-first" in hidden.stderr and "fcfs" in hidden.stderr
