"""A plugin whose import fails, as one with a missing dependency would."""

raise ImportError("No module named 'a_missing_dependency'")
