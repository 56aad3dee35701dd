"""The Java client (android_demo/fedclient) compiled and unit-tested once per test run.

``build.sh test`` compiles the client and its JUnit tests and runs them; the tests that start Java
phones use the jar it leaves, and tests/test_java_client.py checks its JUnit result. Under
pytest-xdist the workers share the run's directory (tests/conftest.py ``run_dir``): the first one
to need the client builds it while the others wait on the lock, so the build directory is never
written by two processes, nor rewritten under a running Java phone.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "android_demo" / "fedclient" / "build.sh"
JAR = BUILD.parent / "build" / "fedclient.jar"


@dataclass(frozen=True)
class JavaBuild:
    returncode: int  # of `build.sh test`: 0 when the client compiled and every JUnit test passed
    stdout: str
    stderr: str
    jar_built: bool  # the client compiled (the JUnit tests may still have failed)
    classpath: str  # for `java -cp`


def build_once(run_dir: Path) -> JavaBuild:
    """Runs ``build.sh test`` the first time a process of this run asks; later calls read its record."""
    record = run_dir / "fedclient-build.json"
    with FileLock(str(run_dir / "fedclient-build.lock")):
        if not record.exists():
            JAR.unlink(missing_ok=True)  # its presence afterwards says this build compiled the client
            run = subprocess.run(["bash", str(BUILD), "test"], capture_output=True, text=True, timeout=900)
            classpath = subprocess.run(["bash", str(BUILD), "classpath"], capture_output=True, text=True,
                                       timeout=60).stdout.strip()
            built = JavaBuild(run.returncode, run.stdout, run.stderr, JAR.exists(), classpath)
            record.write_text(json.dumps(asdict(built)))
    return JavaBuild(**json.loads(record.read_text()))
