"""Running the `tritonserver` that the `nvidia-pytriton` wheel bundles, on this machine, with our packages.

The wheel's Python backend needs three things that its server does not find by itself:
- a stub for this Python's version (the wheel has one per minor version) next to `libtriton_python.so`;
- `libpython3.X.so` of *this* interpreter first on LD_LIBRARY_PATH (the stub links it dynamically; a system
  Python of the same minor version would be picked up otherwise), and the wheel's own libraries;
- an environment with numpy < 2: the stub (Triton 2.51) hands tensors to Python with a numpy 1 ABI, and
  with numpy 2 every BYTES input arrives garbled. The stub ignores PYTHONPATH and finds its `sys.prefix`
  from the first `python3` on PATH, so we make a small venv (`<sys.prefix>/covipal-triton/`) that holds
  numpy 1.26 and chains to this environment's site-packages, and put its bin/ first on PATH.

`python -m covipal_export.triton.local --prepare` makes it (`make setup` does); `serve(REPO, ...)` starts the
server and waits for it. On a GPU server or a Jetson, use NVIDIA's Triton builds instead (README).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path

from covipal.errors import CovipalError

NUMPY_FOR_STUB = "numpy==1.26.4"
ENV_DIR = Path(sys.prefix) / "covipal-triton"
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def pytriton_dir() -> Path:
    """The installed `pytriton` package (it holds tritonserver/); a CovipalError when it is not installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise CovipalError("the bundled tritonserver needs the nvidia-pytriton wheel: run `make setup`")
    return Path(spec.origin).parent


def prepare(env_dir: Path = ENV_DIR) -> Path:
    """The stub's environment and backend directory under `env_dir` (made once; safe to run again)."""
    site = env_dir / "lib" / f"python{PY}" / "site-packages"
    stamp = env_dir / ".ready"
    if stamp.is_file():
        return env_dir
    server = pytriton_dir() / "tritonserver"
    stub = server / "python_backend_stubs" / PY / "triton_python_backend_stub"
    if not stub.is_file():
        raise CovipalError(f"nvidia-pytriton has no Python backend stub for Python {PY}")
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(env_dir)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--target", str(site), NUMPY_FOR_STUB], check=True)
    ours = sysconfig.get_paths()["purelib"]  # this environment's site-packages, .pth files (editable installs) too
    (site / "zz_covipal_parent_env.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    backend = env_dir / "backends" / "python"
    backend.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(server / "backends" / "python" / name, backend / name)
    shutil.copy2(stub, backend / "triton_python_backend_stub")
    stamp.touch()
    return env_dir


@dataclass
class LocalServer:
    """One tritonserver process on loopback ports; `stop()` ends it."""

    repository: Path
    http_port: int = 0  # 0: a free port
    grpc_port: int = 0
    log: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self, env_dir: Path) -> list[str]:
        return [str(pytriton_dir() / "tritonserver" / "bin" / "tritonserver"), "--model-repository",
                str(self.repository), "--backend-directory", str(env_dir / "backends"), "--http-address", "127.0.0.1",
                "--grpc-address", "127.0.0.1", "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--allow-metrics", "false", "--exit-timeout-secs", "10", *self.extra_args]

    def start(self, timeout_s: float = 300.0) -> "LocalServer":
        """Start it and wait until the server and its models are ready (or it exits: a CovipalError with
        the log's last lines)."""
        env_dir = prepare()
        self.http_port, self.grpc_port = self.http_port or free_port(), self.grpc_port or free_port()
        log = open(self.log, "wb") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(env_dir), env=server_env(env_dir), stdout=log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CovipalError(f"tritonserver exited with status {self.process.returncode}: {self.tail()}")
            if _ready(self.http_port):
                return self
            time.sleep(0.5)
        self.stop()
        raise CovipalError(f"tritonserver was not ready after {timeout_s:.0f} s: {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        if not self.log or not self.log.is_file():
            return "(no log)"
        text = self.log.read_bytes().decode("utf-8", errors="replace").splitlines()
        errors = [line for line in text if re.match(r"E\d{4} ", line)]  # Triton's error lines: E<MMDD> ...
        return " | ".join((errors or text)[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def server_env(env_dir: Path) -> dict[str, str]:
    """The server's environment: the stub's venv first on PATH, this Python's libpython and the wheel's libraries
    on LD_LIBRARY_PATH, and PYTHONPATH passed on (model.py honours it)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not any(Path(libdir).glob(f"libpython{PY}*.so*")):
        raise CovipalError(f"the Python backend stub needs libpython{PY}.so, and {sys.executable} has none "
                           f"(a Python built with --enable-shared has it)")
    env = dict(os.environ)
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    libs = [libdir, str(pytriton_dir().parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    from covipal.cli import ArgumentParser, positive_int

    parser = ArgumentParser(prog="python -m covipal_export.triton.local",
                            description="run the tritonserver bundled with nvidia-pytriton on a model repository")
    parser.add_argument("repository", type=Path, nargs="?",
                        help="the model repository (python -m covipal_export.triton)")
    parser.add_argument("--prepare", action="store_true", help="only make the Python backend's environment, then exit")
    parser.add_argument("--http-port", type=positive_int, default=8000, help="default: 8000")
    parser.add_argument("--grpc-port", type=positive_int, default=8001, help="default: 8001")
    args = parser.parse_args(argv)
    env_dir = prepare()
    if args.prepare:
        print(f"the Python backend's environment is ready in {env_dir}")
        return 0
    if args.repository is None:
        parser.error("give a model repository, or --prepare")
    server = LocalServer(args.repository, args.http_port, args.grpc_port)
    return subprocess.call(server.command(env_dir), env=server_env(env_dir))


if __name__ == "__main__":
    from covipal.cli import run

    run(main)
