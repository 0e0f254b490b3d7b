"""`redi` commands in fresh processes without paying the imports each time (the kill-and-resume tests run ~30).

One server interpreter imports redi, torch and transformers once and runs no torch operation (so forking it is
safe: no thread pool exists yet). Each command is a ``fork`` of it that runs ``redi.cli.main.main(argv)`` with
its own environment and output file, exactly what ``python -m redi ARGV`` does after its imports. The child
can SIGKILL itself (``REDI_KILL_AT``) like any process: the server reports the exit status, -9 for a kill.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_SERVER = r"""
import json, os, sys
import redi.cli.main, redi.training.api, redi.backends.torch_cuda.backend, transformers
from transformers import AutoTokenizer, AutoModelForCausalLM  # noqa: F401 (resolved once, in the parent)
try:
    import redi.backends.mlx.backend  # noqa: F401
except Exception:
    pass
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.update(request["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the requests' pipe is the server's alone
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 1
        try:
            code = redi.cli.main.main(request["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


@dataclass
class Result:
    returncode: int  # -9: killed by SIGKILL
    output: str  # stdout and stderr together


# macOS: Metal and the Objective-C runtime are not fork-safe once imported, so each command is a plain process.
FORK = sys.platform.startswith("linux")


class ForkRunner:
    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir, self.count, self.env = log_dir, 0, {**os.environ, **env}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=self.env) if FORK else None
        assert self.proc is None or self.proc.stdout.readline().strip() == "ready"

    def run(self, argv: list[str], **env: str) -> Result:
        self.count += 1
        log = self.log_dir / f"call-{self.count}.log"
        if self.proc is None:
            with log.open("w") as fh:
                code = subprocess.run([sys.executable, "-m", "redi", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                      env={**self.env, **env}, timeout=600).returncode
            return Result(code, log.read_text())
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], 600)[0]:  # one line per command, nothing left buffered
            self.proc.kill()
            raise TimeoutError(f"redi {' '.join(argv)} ran over 600 s; its output is in {log}")
        code = int(self.proc.stdout.readline())
        return Result(code, log.read_text())

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
