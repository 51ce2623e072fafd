"""Floating-point operations of one forward pass, counted on the meta device.

``torch.utils.flop_counter`` counts the matrix products and convolutions a pass dispatches
(elementwise work such as norms, activations and the scans' exponentials is not counted;
it is small next to them for every registered architecture). On the meta device no
arithmetic runs, so counting a full patch costs milliseconds and no memory.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(network: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (multiply and add counted separately) of ``network`` on one input of ``input_shape``."""
    network = network.to("meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(torch.zeros(input_shape, device="meta"))
    return int(counter.get_total_flops())
