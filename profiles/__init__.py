"""The real world moesz measures: codecs, models, tasks, policies, hardware and serving components.

Nothing here imports `sim` or `planner`; those packages build on this one.
"""
