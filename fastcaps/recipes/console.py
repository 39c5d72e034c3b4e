"""What a command prints: a progress bar on terminals only, lines above it, durations."""
import sys

__all__ = ["progress_bar", "printer", "fmt_time"]


def progress_bar(total: int, desc: str | None, disable: bool = False, **kwargs):
    """A tqdm progress bar on stderr, disabled (a no-op object) unless both stdout and stderr
    are terminals: logs and pipes get the plain lines only. It disappears when closed."""
    from tqdm import tqdm
    enabled = not disable and sys.stdout.isatty() and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)


def printer(enabled: bool):
    """print for process 0 (others are silent), above the progress bar while one is shown."""
    def say(message: str):
        if not enabled:
            return
        if say.bar is not None and not say.bar.disable:
            say.bar.write(message)  # above the bar
            sys.stdout.flush()
        else:
            print(message, flush=True)
    say.bar = None
    return say


def fmt_time(seconds: float) -> str:
    """Seconds below two minutes, minutes above."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
