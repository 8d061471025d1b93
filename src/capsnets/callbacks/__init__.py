"""Lightning callbacks: the spread-loss margin schedule (more: media logging, routing stats)."""

from capsnets.callbacks.margin_schedule import SpreadMarginSchedule, linear_margin, sigmoid_margin

__all__ = ["SpreadMarginSchedule", "linear_margin", "sigmoid_margin"]
