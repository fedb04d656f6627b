"""run_outputs: what a run writes, written safely: checkpoints behind training, claimed outputs, progress.

What it is: `CheckpointWriter` (checkpoints snapshotted into CPU memory, then written atomically by a thread
while the next epoch trains); the checks every output passes before the work begins (`_refuse_overwrite`,
`_refuse_unwritable`) and the claim that holds it for one process until the work ends (`_claim`: an
exclusive lock on a hidden file beside it; `_claim_output_files` for a command's output files, with the
temp files of a killed run removed); files written as temps and renamed into place together
(`_replaced_together`); SIGTERM as SystemExit, so that cleanup runs (`_stop_on_sigterm`); the score
histogram (`plot_scores`) and the progress line (`Progress`).
What it is not: no config and no training loop: robustitm.py decides what a run writes, and when.
Copy this file with dual_encoder.py and text_tokenizers.py: it imports the standard library, torch, Pillow
(plot_scores) and dual_encoder.py (atomic writes, temp names), which imports text_tokenizers.py.
Usage: with _claim_output_files([("--output", "scores.csv")]), _replaced_together(["scores.csv"]) as temps:
           write(temps[0])  # renamed over scores.csv when the block ends without an error
       writer = CheckpointWriter(); writer.save([("last.pt", ckpt)]); ...; writer.wait()
"""
import contextlib
import glob
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from dual_encoder import _atomic_write, _tmp_next_to


# ------------------------------------------------------------------------------------------------------------
# Run outputs: checkpoints written behind training, score histograms, the progress line
# ------------------------------------------------------------------------------------------------------------

def _snapshot(x, memo):
    """A copy of nested dicts/lists/tuples whose tensors are copied to CPU memory (each tensor once)."""
    if isinstance(x, torch.Tensor):
        if id(x) not in memo:
            memo[id(x)] = x.detach().to("cpu", copy=True)
        return memo[id(x)]
    if isinstance(x, dict):
        return {k: _snapshot(v, memo) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_snapshot(v, memo) for v in x)
    return x


class CheckpointWriter:
    """Writes checkpoints behind training: `save` snapshots them into CPU memory at once (training goes on
    changing its tensors), and a thread pickles and writes them (atomically, flushed to disk) while the next
    epoch trains. One batch of writes in flight: the next `save` and `wait` wait for it, and raise its error.
    The thread is not a daemon: the interpreter finishes a write before it exits."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, items):
        """items: [(path, checkpoint dict)], written in order."""
        self.wait()
        memo = {}
        items = [(path, _snapshot(ckpt, memo)) for path, ckpt in items]
        self.thread = threading.Thread(target=self._write, args=(items,), name="checkpoint-writer")
        self.thread.start()

    def _write(self, items):
        try:
            for path, ckpt in items:
                _atomic_write(path, lambda f: torch.save(ckpt, f))
        except BaseException as e:  # raised in the training thread by the next save or wait
            self.error = e

    def check(self):
        """Raises the error of a write that failed, without waiting for one in flight."""
        if self.error is not None:
            self.wait()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def plot_scores(path, scores, noisy, reference=None, title=""):
    """PNG histogram of clean vs noisy pair scores, and of the mismatched reference pairs' (Pillow only)."""
    from PIL import Image, ImageDraw
    W, H, pad, bins = 640, 360, 40, 60
    s = torch.as_tensor(scores, dtype=torch.float64)
    lo, hi = float(s.min()), float(s.max()) + 1e-9
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    hists = [torch.histc(s[m], bins, lo, hi) for m in (~noisy, noisy)]
    top = max(float(h.max()) for h in hists) or 1.0
    bw = (W - 2 * pad) / bins
    for h, colour in zip(hists, ((60, 140, 60), (200, 60, 60))):
        for b, v in enumerate(h.tolist()):
            x0 = pad + b * bw
            d.rectangle([x0, H - pad - v / top * (H - 2 * pad), x0 + bw - 1, H - pad], outline=colour)
    if reference is not None:  # the reference's histogram as a line, scaled to the same height
        h = torch.histc(torch.as_tensor(reference, dtype=torch.float64), bins, lo, hi)
        h = h / (float(h.max()) or 1.0)
        d.line([(pad + (b + 0.5) * bw, H - pad - v * (H - 2 * pad)) for b, v in enumerate(h.tolist())],
               fill=(30, 30, 160), width=2)
    d.line([pad, H - pad, W - pad, H - pad], fill="black")
    d.text((pad, 8), f"{title}  green: clean pairs, red: noisy pairs, blue line: mismatched reference",
           fill="black")
    d.text((pad, H - pad + 8), f"{lo:.3f}", fill="black")
    d.text((W - pad - 40, H - pad + 8), f"{hi:.3f}", fill="black")
    img.save(path)


def _number(v):
    """A float for a progress line: 4 decimals, or scientific notation for small ones (lr 5.00e-07)."""
    return v if not isinstance(v, float) else f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"


class Progress:
    """One updating line on a terminal, plain lines otherwise."""

    def __init__(self, total, desc):
        self.total, self.desc, self.t0, self.tty = total, desc, time.time(), sys.stdout.isatty()

    def update(self, done, **values):
        rate = done / max(1e-9, time.time() - self.t0)
        eta = (self.total - done) / max(rate, 1e-9)
        extra = " ".join(f"{k} {_number(v)}" for k, v in values.items())
        line = f"{self.desc} {done}/{self.total} {rate:.1f} steps/s eta {eta:.0f}s {extra}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self):
        if self.tty:
            print()


# ------------------------------------------------------------------------------------------------------------
# Claimed outputs: each output checked and held for this process before the work begins, the temp
# files of a killed run removed, files replaced together
# ------------------------------------------------------------------------------------------------------------

def _refuse_overwrite(path, allowed=False, hint="choose another path (nothing is overwritten)"):
    """The guard of every output: an existing file or non-empty folder is written into only when allowed."""
    path = Path(path)
    if allowed or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    raise ValueError(f"{path} {'is not empty' if path.is_dir() else 'exists'}; {hint}")


def _refuse_unwritable(path, flag):
    """The place of an output `path` (a file or a folder), checked before the work: not a symlink to nothing,
    in a folder that exists and can be written in."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{flag} {path} is a symlink to {os.readlink(path)}, which does not exist; "
                                f"create that, or remove the link")
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: cannot write in {folder} (read-only, or not yours); choose "
                              f"another place")


@contextlib.contextmanager
def _claim(path, flag):
    """Holds the output `path` (a run's folder, or a file) for this process until the block ends, after
    _refuse_unwritable: an exclusive lock on the hidden file .<name>.lock beside it (removed at the end; the
    kernel releases the lock of a process that dies). A second run writing the same path is refused."""
    import fcntl  # (POSIX)
    _refuse_unwritable(path, flag)
    path, real = Path(path), Path(os.path.realpath(path))  # one lock for every spelling: ".", "x/..", a link
    if real.parent == real:
        raise ValueError(f"{flag} {path}: the file system's root cannot be an output; choose a folder in it")
    lock = real.with_name(f".{real.name}.lock")
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FileExistsError(f"another run is writing {flag} {path} now (it holds {lock}); wait for "
                                  f"it to end, or choose another {flag}") from None
        except OSError as e:  # a file system without flock (some network and FUSE mounts)
            os.close(fd)
            raise OSError(f"{flag} {path}: cannot lock {lock} ({e.strerror}); choose a {flag} on a local "
                          f"file system") from None
        try:  # the lock's last holder may have removed it between our open and flock: then again
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield path
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _is_rank0():
    """Whether this process writes the outputs (rank 0 under torchrun, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def _claim_output_files(outputs):
    """score's and eval's hold on their output files [(flag, path)] until the block ends, each checked first:
    a new file (not a folder) in a writable folder, no two the same file (one would replace the other)."""
    paths = {}
    for flag, path in outputs:
        other = paths.setdefault(os.path.realpath(path), flag)
        if other != flag:
            raise ValueError(f"{other} and {flag} are the same file {path}: one would replace the other; "
                             f"give each its own path")
    with contextlib.ExitStack() as claims:
        for flag, path in outputs:
            if _is_rank0():
                claims.enter_context(_claim(path, flag))
                _remove_stale_temps(path)
            if Path(path).is_dir():
                raise IsADirectoryError(f"{flag} {path} is a folder; give the path of a file to write")
            _refuse_unwritable(path, flag)
            _refuse_overwrite(path)
        yield


def _remove_stale_temps(path):
    """Removes the temp files beside the output `path` (_tmp_next_to's: .<name>[.<tag>].tmp<pid>) that an
    earlier run of it left when it was killed: those of processes that are gone."""
    path = Path(path)
    temp = re.compile(rf"\.{re.escape(path.name)}(\.[a-z]+[0-9]*)?\.tmp([0-9]+)")
    for tmp in path.parent.glob(f".{glob.escape(path.name)}*.tmp*"):
        match = temp.fullmatch(tmp.name)
        if match and not _alive(int(match[2])):
            tmp.unlink(missing_ok=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM (torchrun stopping the other ranks when one fails, kill) raises SystemExit in the main thread
    until the block ends, so that `finally` blocks remove temp files; Ctrl-C already does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _replaced_together(paths):
    """Temp paths beside `paths`, one each, for the block to write; when it ends without an error they are
    flushed to disk and renamed over `paths` together. Whatever happens, no temp file is left."""
    temps = [_tmp_next_to(path, "new") for path in paths]
    try:
        yield temps
        for tmp in temps:
            fd = os.open(tmp, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        for path, tmp in zip(paths, temps):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
