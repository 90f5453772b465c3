"""One overall progress bar across arms x seeds, with an ETA (tqdm when installed, else plain lines)."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``total`` runs, ``done`` of them finished before this session (resumed; they do not count
    towards the rate). ``use_tqdm=None``: tqdm if it can be imported."""

    def __init__(self, total: int, done: int = 0, *, use_tqdm: bool | None = None, stream=None):
        self.total, self.done, self.stream = total, done, stream if stream is not None else sys.stderr
        self.start, self.resumed = time.perf_counter(), done
        self.bar = None
        if use_tqdm is not False:
            try:
                from tqdm import tqdm
            except ImportError:
                if use_tqdm:
                    raise
            else:
                self.bar = tqdm(total=total, initial=done, desc="ablation", unit="run", file=self.stream,
                                dynamic_ncols=True, smoothing=0)
        if self.bar is None:
            self._line("start")

    def eta_s(self) -> float | None:
        ran = self.done - self.resumed
        if ran == 0:
            return None
        return (time.perf_counter() - self.start) / ran * (self.total - self.done)

    def _line(self, message: str) -> None:
        eta = self.eta_s()
        print(f"[ablation] {self.done}/{self.total} runs, {_clock(time.perf_counter() - self.start)} elapsed, "
              f"ETA {'?' if eta is None else _clock(eta)}: {message}", file=self.stream, flush=True)

    def update(self, message: str) -> None:
        """One more run finished; ``message`` says which and how it went."""
        self.done += 1
        if self.bar is None:
            self._line(message)
        else:
            self.bar.write(f"[ablation] {message}", file=self.stream)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
