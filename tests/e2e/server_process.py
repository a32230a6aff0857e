"""A sensorseal server as a real child process: start it, read what it announces, stop it.

One helper for every end-to-end test that runs `sensorseal serve` / `python -m sensorseal.server`
(imported by name: pytest puts this folder on sys.path for the tests in it).
"""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence

SERVING = "sensorseal: serving on "


class ServerProcess:
    """The child's combined output is pumped into `output`; `wait_for` reads announcements."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 timeout: float = 20.0) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env=None if env is None else dict(env))
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, marks: Mapping[str, str]) -> dict[str, str]:
        """For each name -> text in `marks`, the first word after that text in the output.
        Stops the process and fails with its output if they do not all appear in time."""
        found: dict[str, str] = {}
        while len(found) < len(marks):
            try:
                line = self.lines.get(timeout=self.timeout)
            except queue.Empty:
                self.stop()
                raise AssertionError("server did not start:\n" + "".join(self.output)) from None
            for name, mark in marks.items():
                if mark in line:
                    found[name] = line.split(mark, 1)[1].split()[0]
        return found

    def wait_for_url(self) -> str:
        return self.wait_for({"url": SERVING})["url"]

    def stop(self) -> None:
        """SIGTERM (a clean stop), then SIGKILL if it does not exit within 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
