"""Runs `moeify.cli.main` many times, each in a forked child of one process that imported every verb's
module once: a command starts in milliseconds instead of the seconds `import torch` takes.

Protocol: one JSON request a line on stdin ({"argv", "cwd", "log", "budget"}), one JSON reply a line on
stdout ({"code", "seconds"}). The child writes its stdout and stderr to `log`. A command still running
after `budget` seconds is interrupted as by Ctrl-C (SIGINT: moeify cleans up and exits 130); one that
does not end within `HANG` seconds more is killed (code -9). Only imports happen here, no torch
operation: a child forked from a process whose OpenMP pool had run could hang.
"""

import json
import os
import signal
import sys
import time
from importlib import import_module

HANG = 60

if __name__ == "__main__":
    from moeify.cli import VERBS, main

    for verb in VERBS:
        import_module(verb.schema.partition(":")[0])
        import_module(verb.run.partition(":")[0])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.chdir(request["cwd"])
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a job started in the background ignores SIGINT
            signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
            signal.setitimer(signal.ITIMER_REAL, request["budget"])
            try:
                code = main(request["argv"])
            except KeyboardInterrupt:  # the budget ran out before the verb itself started
                code = 130
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
        deadline = started + request["budget"] + HANG
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = -9
                break
            time.sleep(0.01)
        print(json.dumps({"code": code, "seconds": round(time.monotonic() - started, 2)}), flush=True)
