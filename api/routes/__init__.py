"""One router per resource: jobs, devices, health."""
