"""Example ernie-serve plugin package."""
