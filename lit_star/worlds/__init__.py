"""Procedurally generated worlds in which the whole curriculum runs on a CPU and is scored exactly."""
