"""Measurements of MVFA: per-stage speed, the sources of bf16 drift, and the prepared GPU check."""
