"""The math of onspec: pure functions over tensors, each citing the equation it implements."""
