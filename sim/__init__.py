"""Prediction: the discrete-event simulator of expert traffic and the closed-form cost model.

Imports `profiles` only; never `planner`.
"""
