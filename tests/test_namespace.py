"""fedfleet installs one namespace: a user's own `export.py` or `server/` beside their script breaks nothing."""

import os
import subprocess
import sys
from pathlib import Path


def test_packages_import_only_under_fedfleet_from_a_users_folder(tmp_path: Path) -> None:
    (tmp_path / "export.py").write_text("raise SystemExit('the user export.py was imported')\n")
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "__init__.py").write_text("raise SystemExit('the user server/ was imported')\n")
    code = (
        "import importlib.util\n"
        "import fedfleet.device_runtime.protocol_client, fedfleet.export.manifest, fedfleet.protocol.wire, fedfleet.server.app\n"
        "assert importlib.util.find_spec('protocol') is None, 'a bare protocol package is installed'\n"
        "assert importlib.util.find_spec('device_runtime') is None, 'a bare device_runtime package is installed'\n"
        "print(fedfleet.server.app.__name__, fedfleet.export.manifest.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # what is installed, not a source checkout
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fedfleet.server.app", "fedfleet.export.manifest"]
