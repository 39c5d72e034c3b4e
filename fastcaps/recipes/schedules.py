"""Learning-rate schedules of the training commands, as LambdaLR factors."""

__all__ = ["ExponentialDecay", "DecayToFinal", "lr_factor"]


class ExponentialDecay:
    """LambdaLR factor of tf.train.exponential_decay (staircase=False), with the authors' floor:
    lr(step) = max(lr0 * rate^(step / steps), min_lr)."""

    def __init__(self, rate: float, steps: int, min_factor: float):
        self.rate, self.steps, self.min_factor = rate, steps, min_factor

    def __call__(self, step: int) -> float:
        return max(self.rate ** (step / self.steps), self.min_factor)


class DecayToFinal:
    """LambdaLR factor of --schedule end-low: lr decays exponentially, smoothly, from lr0 at step 0
    to final_lr at the last step: lr(step) = lr0 * (final_lr / lr0)^(step / total_steps)."""

    def __init__(self, final_factor: float, total_steps: int):
        self.final_factor, self.total_steps = final_factor, total_steps

    def __call__(self, step: int) -> float:
        return self.final_factor ** (min(step, self.total_steps) / self.total_steps)


def lr_factor(schedule: str, lr: float, total_steps: int, *, final_lr: float, lr_decay: float = 0.96,
              lr_decay_steps: int = 2000, min_lr: float = 1e-6):
    """The LambdaLR factor of a --schedule: "authors" (ExponentialDecay: x lr_decay every
    lr_decay_steps, floored at min_lr) or "end-low" (DecayToFinal: to final_lr at total_steps)."""
    if schedule == "end-low":
        return DecayToFinal(final_lr / lr, total_steps)
    if schedule == "authors":
        return ExponentialDecay(lr_decay, lr_decay_steps, min_lr / lr)
    raise ValueError(f"schedule must be 'authors' or 'end-low', got {schedule!r}")
