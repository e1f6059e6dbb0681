"""Flow definitions the tests share, and a clock the tests control: the public helpers of
`flowstore.testing`, under the names the tests have always used."""

from __future__ import annotations

from flowstore.testing import Clock
from flowstore.testing import linear_flow as linear
from flowstore.testing import onboarding_flow as onboarding
from flowstore.testing import ring_flow as ring

__all__ = ["Clock", "linear", "onboarding", "ring"]
