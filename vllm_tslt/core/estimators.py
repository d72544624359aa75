"""Online estimators shared by the device's adaptive γ and the edge's step-cost report.

Both forget exponentially (a half-life in observations), so they follow a changing link or load.
"""

from __future__ import annotations

import math


class Ewma:
    """Exponentially weighted mean with a half-life in observations; None until the first one."""

    def __init__(self, half_life: float) -> None:
        self.decay = 0.5 ** (1.0 / half_life)
        self.value: float | None = None

    def add(self, x: float, weight: float | None = None) -> None:
        """Fold in x; ``weight`` (default 1 - decay) is its share, e.g. 0.5 for a probe that
        should count as much as all older evidence."""
        w = 1 - self.decay if weight is None else weight
        self.value = x if self.value is None else (1 - w) * self.value + w * x


class DiscountedLine:
    """y = a + b·x (a, b >= 0) by least squares over exponentially discounted sums.

    The device fits round time against payload bytes (b = 1 / uplink rate); the edge fits step time
    against scheduled draft tokens (b = verification cost per token). The slope is identified only
    when x varies; otherwise the model is the mean of y (slope 0): no slope is invented from one x.
    """

    MIN_REL_SPREAD = 0.05  # std(bytes) / mean(bytes) needed to fit a slope

    def __init__(self, half_life: float) -> None:
        self.decay = 0.5 ** (1.0 / half_life)
        self.sums = [0.0] * 5  # Σw, Σw·x, Σw·y, Σw·x², Σw·x·y
        self.count = 0

    def add(self, x: float, y: float, keep: float = 1.0) -> None:
        """Add one observation; ``keep`` < 1 discounts the past further (rare probe rounds)."""
        x, y = float(x), float(y)
        d = self.decay * keep
        self.sums = [d * s + v for s, v in zip(self.sums, (1.0, x, y, x * x, x * y))]
        self.count += 1

    def fit(self) -> tuple[float, float]:
        """(a, b), both >= 0."""
        w, sx, sy, sxx, sxy = self.sums
        if w <= 0:
            return 0.0, 0.0
        mx, my = sx / w, sy / w
        var = max(sxx / w - mx * mx, 0.0)
        slope = 0.0
        if mx > 0 and math.sqrt(var) >= self.MIN_REL_SPREAD * mx:
            slope = max((sxy / w - mx * my) / var, 0.0)
        r0 = my - slope * mx
        if r0 < 0:  # all of y scales with x
            r0, slope = 0.0, (my / mx if mx > 0 else 0.0)
        return r0, slope

    def predict(self, x: float) -> float:
        r0, slope = self.fit()
        return r0 + slope * x

    @property
    def rate(self) -> float | None:
        """1 / slope (x per unit of y), None while the slope is 0."""
        slope = self.fit()[1]
        return 1.0 / slope if slope > 1e-12 else None
