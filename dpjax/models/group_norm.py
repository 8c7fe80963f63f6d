"""How many groups a GroupNorm of a given width has: one rule for every model.

GroupNorm normalizes over groups of one example's channels, so no statistic ever mixes
examples (DP-SGD clips per example; BatchNorm would leak across the batch). DDPM++
(Song et al. 2021) and DPDM take min(C // 4, 32) groups, which must divide C: a width
such as 18 or 132 failed at initialization. ``num_groups`` keeps that count whenever
it divides C (every width the published configurations use) and otherwise takes the
largest smaller count that does; the parameters (one scale and offset per channel) are
the same either way.
"""

from __future__ import annotations


def num_groups(channels: int, cap: int = 32, channels_per_group: int = 4) -> int:
    """The largest g <= min(channels // channels_per_group, cap), g >= 1, dividing
    ``channels``.

    Raises:
      ValueError: ``channels`` < 1.
    """
    if channels < 1:
        raise ValueError(f"A GroupNorm needs at least one channel, got {channels}.")
    groups = max(1, min(cap, channels // channels_per_group))
    while channels % groups:
        groups -= 1
    return groups
