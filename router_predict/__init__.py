"""Routing traces, expert predictors, the prefetch planner and cache-policy replay; depends only on the trace format."""
