"""End-to-end benchmark: one CapsNet training step with eager vs fused routing.

Timed: forward (with labels, as in training), margin + reconstruction loss, backward and one
Adam step, in fp32 or under bf16 autocast. Setting the gradients to None (a host-side
operation) happens before the start mark. Parameters, Adam state and the batch are allocated
before the timed region, so the peak memory is activations, gradients and the optimizer's
transients. Random images and labels: no step depends on the values.
"""
import torch

import fastcaps

from . import harness

E2E_PROVIDERS = ("eager", "fused")
E2E_PRECISIONS = ("float32", "bf16-autocast")


def train_step_row(routing: str, precision: str, batch: int, device: torch.device, iterations: int,
                   **timing) -> dict:
    """Measure one (routing, precision) training step; returns a result row."""
    row = {"routing": routing, "precision": precision, "batch": batch, "iterations": iterations}
    reason = harness.unavailable_reason(routing, device)
    if reason:
        return {**row, "status": "skipped", "reason": reason}

    def run():
        torch.manual_seed(0)
        model = fastcaps.CapsNet(routing=routing, iterations=iterations).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        images = torch.rand(batch, 1, 28, 28, device=device)
        labels = torch.randint(0, 10, (batch,), device=device)
        autocast = precision == "bf16-autocast"

        def prepare(_):
            optimizer.zero_grad(set_to_none=True)

        def step(_):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                output = model(images, labels)
                total, _, _ = fastcaps.capsnet_loss(output, images, labels)
            total.backward()
            optimizer.step()

        return harness.measure(prepare, step, device, **timing)

    return {**row, **harness.guarded(run, device)}
