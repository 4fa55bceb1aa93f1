"""support/preemption.py: used by train.py (main and its loop). Preemption as a normal stop: SIGTERM (what a cluster
scheduler, docker stop and systemd send) and SIGINT (Ctrl-C) ask the run to stop after the step it is in; train.py
then checkpoints that step, prints the exact command that resumes it and exits with PREEMPTED. A second signal stops
the process at once, by the signal's own default action, leaving the checkpoints on disk as they were (a save it
cuts short is a temporary dir the next run removes).

A signal that comes within SAME_STOP_S of the first is the same request: torchrun forwards the SIGTERM or SIGINT it
receives to every worker, and a terminal's Ctrl-C reaches torchrun and its workers alike, so each worker may see the
one stop twice. Under torchrun the workers have its --shutdown_timeout (30 s by default) to stop before it kills
them: give it a step and a checkpoint's time.
"""

import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the user is invited to retry (here: resume)
SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_STOP_S = 2.0


class StopSignals:
    """While installed (`with StopSignals(...) as stop:`, in the main thread; elsewhere it does nothing), the first
    SIGTERM or SIGINT sets `signum` for the loop to see; a second one, SAME_STOP_S or more later, ends the process now.
    `say(text)` prints on this process (rank 0) when a signal comes; `last_checkpoint()` names the newest complete
    step dir for that message."""

    def __init__(self, say=None, last_checkpoint=lambda: None, resume=""):
        self.say, self.last_checkpoint, self.resume = say, last_checkpoint, resume
        self.signum, self.first_at, self.previous = 0, 0.0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # a signal ignored by whoever started us
            self.previous = {s: signal.signal(s, self.handle) for s in SIGNALS  # (nohup, a shell's & for
                             if signal.getsignal(s) is not signal.SIG_IGN}     # SIGINT) stays ignored
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.signum:
            self.signum, self.first_at = signum, time.monotonic()
            self._say(f"train.py: {name}: stopping after this step, with a checkpoint (a second {name} stops at "
                      "once)")
            return
        if time.monotonic() - self.first_at < SAME_STOP_S:
            return  # the same stop, forwarded (torchrun) or sent to the whole process group (a terminal)
        last = self.last_checkpoint()
        self._say(f"train.py: second {name}: stopped at once; "
                  + (f"the checkpoints are as they were, the newest {last}; resume with: {self.resume}" if last
                     else "no checkpoint was written"))
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _say(self, text: str):
        if self.say:
            self.say(text)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def say_now(text: str):
    """One line on stderr from a signal handler, on a line of its own (a progress bar may be drawing): a raw write,
    which takes no lock the interrupted code may hold."""
    try:
        os.write(sys.stderr.fileno(), f"\n{text}\n".encode())
    except (OSError, ValueError):  # stderr is no file (captured)
        print(text, file=sys.stderr)


def command_line(script: str, argv: list[str], resume: bool) -> str:
    """The shell command that runs this training again: the same interpreter (as `python` when that is the one on
    PATH), or torchrun with this launch's process counts, the script and argv; with resume, --init_from=resume in
    place of any init_from and no --overwrite."""
    if resume:
        argv = [a for a in argv if not a.startswith(("--init_from=", "--overwrite"))] + ["--init_from=resume"]
    env = os.environ
    world = env.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:  # a bad one is refused before any step
        group = env.get("GROUP_WORLD_SIZE", "1")
        nodes = int(group) if group.isdigit() else 1
        launch = ["torchrun", f"--nproc_per_node={env.get('LOCAL_WORLD_SIZE', '1')}"]
        launch += (["--standalone"] if nodes == 1 else
                   [f"--nnodes={nodes}", "--node_rank=N", f"--master_addr={env.get('MASTER_ADDR', '')}",
                    f"--master_port={env.get('MASTER_PORT', '')}"])
    else:
        on_path = shutil.which("python")
        same = on_path and Path(on_path).resolve() == Path(sys.executable).resolve()
        launch = ["python" if same else sys.executable]
    return shlex.join([*launch, script, *argv])
