"""Start `banditgate serve` as a real subprocess for tests, and wait until it is ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServeProcess:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        return int(self.process.returncode)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def start_serve(config: dict, workdir: Path, timeout_s: float = 60.0, env: dict[str, str] | None = None,
                scheme: str = "http", ready_path: str = "/v2/health/ready", ssl_context=None) -> ServeProcess:  # type: ignore[no-untyped-def]
    """Write `config` (ports filled in when absent) and run `banditgate serve` until it answers ready."""
    server = config.setdefault("server", {})
    server.setdefault("http_port", free_port())
    server.setdefault("grpc_port", free_port())
    path = write_config(workdir / f"serve-{server['http_port']}.yaml", config)
    log_path = workdir / f"serve-{server['http_port']}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen([sys.executable, "-m", "banditgate.cli", "serve", "-c", str(path)], stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
    serve = ServeProcess(process, server["http_port"], server["grpc_port"], log_path)
    deadline = time.monotonic() + timeout_s
    url = f"{scheme}://127.0.0.1:{server['http_port']}{ready_path}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"banditgate serve exited with {process.returncode}: {serve.log()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=ssl_context) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return serve
        except OSError:
            pass
        time.sleep(0.2)
    serve.stop(signal.SIGKILL)
    raise RuntimeError(f"banditgate serve was not ready within {timeout_s}s: {serve.log()[-2000:]}")
