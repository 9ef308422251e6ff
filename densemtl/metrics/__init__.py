"""Stateful evaluation metrics following the published protocols (update / compute / reset / sync)."""
