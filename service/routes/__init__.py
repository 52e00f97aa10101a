"""One router per resource: jobs, fronts, events, candidates, health."""
