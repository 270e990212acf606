"""Padding of token rows into batches, and the label that marks a position without a target."""

IGNORE_INDEX = -100

