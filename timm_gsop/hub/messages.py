"""What the export says: its error, and its progress and warning lines (on stderr)."""
import sys
import time

__all__ = ['ExportError', 'Reporter']


class ExportError(Exception):
    """A checkpoint that cannot be exported, or an export that cannot be written; the message says why."""


class Reporter:
    """``progress(msg)``: timed progress lines when verbose; ``warn(msg)``: always shown."""

    def __init__(self, verbose: bool = True, prefix: str = 'timm-gsop'):
        self.verbose, self.prefix, self._start = verbose, prefix, time.monotonic()

    def progress(self, msg: str) -> None:
        if self.verbose:
            print(f'[{self.prefix} {time.monotonic() - self._start:6.1f}s] {msg}', file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        print(f'{self.prefix}: warning: {msg}', file=sys.stderr, flush=True)

