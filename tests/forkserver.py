"""Fork server for tests/test_reliability.py: import condiff once, then fork ``condiff`` CLI runs on request.

Each run is a separate process executing ``condiff.cli.main(argv)`` exactly as
``python -m condiff`` does, minus the 3-5 s of importing torch, so a test can
start (and SIGKILL) many training processes quickly.  torch has run no op in
this process before it forks, so the children start with no threads.

Protocol, one line each way on stdin/stdout:
    run LOGFILE JSON_ARGV  ->  pid PID
    wait PID               ->  status CODE   (exit code, or -N for signal N)
"""

import json
import os
import sys

import condiff.checkpoints  # noqa: F401  - the expensive imports, done once
import condiff.cli
import condiff.data  # noqa: F401
import condiff.nets  # noqa: F401
import condiff.pipeline  # noqa: F401
import condiff.training  # noqa: F401
import torch._dynamo  # noqa: F401  - torch.optim imports it lazily on first use (seconds)


def _child(log: str, argv: list) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        code = condiff.cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, then exit non-zero
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


def main() -> None:
    for line in sys.stdin:
        cmd, _, rest = line.strip().partition(" ")
        if cmd == "run":
            log, argv = rest.split(" ", 1)
            pid = os.fork()
            if pid == 0:
                _child(log, json.loads(argv))
            print("pid", pid, flush=True)
        elif cmd == "wait":
            _, status = os.waitpid(int(rest), 0)
            print("status", os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    main()
