"""Code generation: the plan rendered through Jinja templates into C (and later OpenCL)."""
